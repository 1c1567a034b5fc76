"""Who is asking and who holds what: `PodInfo`, the pod an ADD is for (with the annotations that
say what it wants), and `Holder`, the one attachment of one container that holds something (an
attachment record, a VF). Both are filled from CNI_ARGS and the runtime's pod annotations, or
from the API in cluster mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict

from cnispec import cni
from cnispec.errors import PlexusError


@dataclass(frozen=True, slots=True)
class PodInfo:
    namespace: str
    name: str
    uid: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


class Holder(BaseModel):
    """Who holds an attachment or a device: one interface (`ifname`) of one container, in the
    pod it belongs to. For a device, container and ifname say who holds it (an interface name
    is one interface of the container at a time); an attachment record adds its network to
    that key (`metaplugin.store.AttachmentKey`), so records of an interface name that passed
    from one network to another stay apart. The rest is for people (logs, `plexusctl vfs`) and
    for finding the netns again."""

    model_config = ConfigDict(frozen=True)

    container_id: str
    ifname: str
    netns: str = ""
    pod_namespace: str = ""
    pod_name: str = ""
    pod_uid: str = ""

    def same_attachment(self, other: Holder) -> bool:
        return (self.container_id, self.ifname) == (other.container_id, other.ifname)

    @property
    def pod_ref(self) -> str:
        """`namespace/name`, or the container ID when the holder is no Kubernetes pod."""
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_name else self.container_id

    @classmethod
    def of(
        cls, container_id: str, ifname: str, netns: str, pod: PodInfo | None, *, uid: str = ""
    ) -> Holder:
        """`uid`: the pod UID from CNI_ARGS, for a container that is no pod Plexus knows."""
        return cls(
            container_id=container_id,
            ifname=ifname,
            netns=netns,
            pod_namespace=pod.namespace if pod else "",
            pod_name=pod.name if pod else "",
            pod_uid=pod.uid if pod else uid,
        )

    @classmethod
    def from_cni_args(cls, container_id: str, ifname: str, netns: str, cni_args: str) -> Holder:
        """For a delegate, which sees the pod only through CNI_ARGS."""
        try:
            args = cni.parse_cni_args(cni_args)
        except PlexusError:
            args = {}  # the pod fields are for people; (container, ifname) is the key
        return cls(
            container_id=container_id,
            ifname=ifname,
            netns=netns,
            pod_namespace=args.get(cni.ARG_POD_NAMESPACE, ""),
            pod_name=args.get(cni.ARG_POD_NAME, ""),
            pod_uid=args.get(cni.ARG_POD_UID, ""),
        )
