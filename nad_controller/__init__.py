"""Cluster-side reconcilers: NAD validation, VF pool policies, multicast networks (to come)."""
