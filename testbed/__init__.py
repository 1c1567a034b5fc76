"""The test bed: worlds that tests, benchmarks and the demo build to run Plexus for real, and
remove afterwards. Network namespaces standing for nodes and pods (`netns`), a real plexusd in
one of them (`daemon`), a minimal CNI runtime that execs the shim as libcni does (`runtime`),
containerd driven through its CRI as kubelet drives it (`cri`, with an image built offline by
`oci`), a synthetic SR-IOV sysfs with real links and kernel-format uevents (`sriov_bed`), and
the network configs they share (`manifests`).

It is a package of its own so that its API is kept like any other: the demo (the README's first
command) and the benchmarks depend on it, and a contract keeps product code from importing it.
Nothing here imports pytest: a bed that cannot run on this machine raises `BedUnavailable`,
which tests turn into a skip (or, in CI, a failure) and the demo into a clear message.
"""


class BedUnavailable(Exception):
    """This machine cannot run the bed (a tool missing, not root); the message says what."""
