"""SR-IOV below the delegate: PF/VF inventory from sysfs and uevents, the node's VF pools and
where they come from, membership and health, numVfs, the VF state machine and its durable
ledger, moving VF netdevs in and out of pods, release and audit, device assignment for the
orchestrator, and the kubelet device plugin and PodResources client. The `plexus-sriov`
delegate (`delegates.sriov`) attaches VFs through `sriov.owner.VfOwner`; plexusd builds all of
it through `sriov.node.SriovNode`."""
