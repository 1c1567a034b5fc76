"""The node's kernel, as Plexus talks to it: one rtnetlink transport (`rtnl`) with the typed
netlink adaptor on it (`netlink`), the PF-side VF codec (`vf`) and the link-state listener
(`linkwatch`); network namespaces without moving a shared thread (`netns`); and the libc calls
Python lacks (`libc`). Below `delegates` and `sriov`, above only the ground floor (`cnispec`):
it knows links, routes and namespaces, never pods, networks or pools.
"""
