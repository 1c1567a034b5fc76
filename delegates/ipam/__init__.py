"""In-process IPAM for the built-in delegates: `host-local` and `static`, run without exec'ing a
binary. `HostLocalIpam` keeps its leases in the reference plugin's on-disk format, so it shares a
dataDir safely with containernetworking/plugins' `host-local`; `StaticIpam` keeps no state.
`IpamPaths` is where a config may make host-local write and read (`delegates.ipam.paths`).
"""

from delegates.ipam.host_local import HostLocalIpam
from delegates.ipam.paths import IpamPaths
from delegates.ipam.static import StaticIpam

__all__ = ["HostLocalIpam", "IpamPaths", "StaticIpam"]
