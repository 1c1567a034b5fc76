"""Delegates: everything that makes an attachment, behind one small interface (`delegates.plugin`).

A delegate is a CNI plugin, run either in-process (built-ins, selected by `type`) or by exec'ing a
binary found on the CNI path (`delegates.external`). `delegates.chain` runs one network config
(single plugin or conflist) the way libcni does. Nothing here talks to the Kubernetes API; a
delegate sees the pod only through its request (CNI_ARGS), and the orchestrator in `metaplugin`
decides what to run.
"""
