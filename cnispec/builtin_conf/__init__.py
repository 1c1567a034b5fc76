"""The config models of Plexus's built-in delegates, on the ground floor.

The delegates (`delegates.routed`, `delegates.macvlan`, `delegates.ipvlan`, `delegates.sriov`,
`delegates.overlay`, the in-process IPAM) parse their configs with these models at ADD; the
cluster controller's admission webhook and `plexusctl validate` check a NAD with the same
models before any pod uses it (`cnispec.validation`), without importing the delegates. Pure:
no kernel, no files.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel

from cnispec.builtin_conf.links import (
    IpvlanConf,
    MacvlanConf,
    MulticastKeys,
    OverlayConf,
    RoutedConf,
    SbrConf,
    SriovConf,
    SubLinkConf,
)

# Every built-in `type` and the model its config must pass (`delegates.builtins` registers
# exactly these types: a unit test holds the two lists together).
MODELS: Final[dict[str, type[BaseModel]]] = {
    "plexus-routed": RoutedConf,
    "plexus-macvlan": MacvlanConf,
    "plexus-ipvlan": IpvlanConf,
    "plexus-sriov": SriovConf,
    "plexus-sbr": SbrConf,
    "plexus-overlay": OverlayConf,
}
# The IPAM types the built-ins run in-process (any other is exec'd from the CNI path).
IPAM_TYPES: Final = ("host-local", "static")

__all__ = [
    "IPAM_TYPES",
    "MODELS",
    "IpvlanConf",
    "MacvlanConf",
    "MulticastKeys",
    "OverlayConf",
    "RoutedConf",
    "SbrConf",
    "SriovConf",
    "SubLinkConf",
]
