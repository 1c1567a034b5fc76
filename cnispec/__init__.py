"""The ground floor: what every layer of Plexus shares and nothing of Plexus lies below.

The CNI protocol (`cni`), the typed errors and their codes (`errors`), network configs as parsed
and as prepared to run (`netconf`), NetworkAttachmentDefinitions (`nad`) and the pod annotations
that select them (`annotations`), CNI conf files on disk (`confdir`), who asks and who holds
(`identity`), and the one durable-write helper (`durable`). Pure models and file reads: nothing
here touches the kernel's networking or the Kubernetes API, so the node daemon, the delegates,
SR-IOV and the cluster controller can all stand on it.
"""
