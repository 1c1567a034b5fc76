"""Plexus meta-plugin: CNI protocol, shim, node daemon, orchestration, attachment store.

Keep this file empty of imports: the shim is also run as `python -m metaplugin.shim` and must not
pay for anything heavy.
"""
