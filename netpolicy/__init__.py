"""Network policy: Kubernetes NetworkPolicy on the pod's primary interface, MultiNetworkPolicy on
the secondaries its `k8s.v1.cni.cncf.io/policy-for` names, and Plexus's isolation modes, compiled
into one nftables table per pod network namespace.

The package is pure (models, selectors, compiler, nft rendering); it imports only the ground
floor. plexusd feeds it a `PolicyWorld` (policies, namespaces, pods with their addresses per
network) and applies what `render()` returns inside each local pod's netns, atomically.

- `netpolicy.model`: the inputs (`Policy`, `Namespace`, `Pod`, `PolicyWorld`) and the outputs
  (`PodRules`, `InterfaceRules`, `DirectionRules`, `Allow`).
- `netpolicy.compile`: `compile_world(world) -> dict[pod key, PodRules]`, the upstream semantics.
- `netpolicy.nft`: `render(rules) -> str`, one nft transaction that replaces the pod's table.
"""
