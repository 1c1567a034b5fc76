"""The config models of Plexus's built-in delegates, on the ground floor.

The delegates (`delegates.routed`, `delegates.macvlan`, `delegates.ipvlan`, `delegates.sriov`,
the in-process IPAM) parse their configs with these models at ADD; the cluster controller's
admission webhook and `plexusctl validate` check a NAD with the same models before any pod
uses it (`cnispec.validation`), without importing the delegates. Pure: no kernel, no files.
"""

from __future__ import annotations

from cnispec.builtin_conf.links import (
    IpvlanConf,
    MacvlanConf,
    RoutedConf,
    SriovConf,
    SubLinkConf,
)

__all__ = ["IpvlanConf", "MacvlanConf", "RoutedConf", "SriovConf", "SubLinkConf"]
