"""The node daemon's configuration: one pydantic model, loaded from a YAML/JSON file and then
overridden by command-line flags.

Keys are camelCase and reuse Multus's names where they mean the same thing, so a Multus
daemon-config translates key for key. Every path is overridable so tests never touch the
machine's own /run, /var/lib or /etc/cni. `plexusd --help` is generated from the field
descriptions below, so the help can never drift from the model.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from cnispec.errors import InvalidConfig
from delegates.ipam.paths import DEFAULT_RESOLV_CONFS, IpamPaths

CONF_FILE_NAME = "00-plexus.conflist"
NETWORK_NAME = "plexus"
SOCKET_NAME = "plexus.sock"
_SHARED_DIRS = frozenset({"/", "/run", "/var/run", "/tmp", "/var/tmp", "/var/lib", "/var"})


class FabricNode(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    name: str
    addresses: list[str] = Field(
        validation_alias=AliasChoices("addresses", "address"),
        min_length=1,
        description="The node's underlay addresses (one per family).",
    )
    pod_cidrs: list[str] = Field(alias="podCIDRs", min_length=1)

    @field_validator("addresses", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class FabricSettings(BaseModel):
    """The flat pod network of the `plexus-routed` primary (config file only)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    mode: Literal["native", "vxlan"] = Field(
        default="native",
        description="native: other nodes' pod subnets via their underlay address; vxlan: over "
        "a VXLAN overlay (MTU minus 50).",
    )
    interface: str | None = Field(
        default=None, description="Underlay interface (default: the default-route one)."
    )
    address: str | None = Field(
        default=None, description="This node's underlay address (default: the interface's)."
    )
    pod_cidrs: list[str] = Field(
        default_factory=list,
        alias="podCIDRs",
        description="This node's pod subnets (cluster mode: the Node's spec.podCIDRs).",
    )
    vni: int = Field(default=4242, ge=1, le=16777215)
    port: int = Field(default=4789, ge=1, le=65535)
    nodes: list[FabricNode] = Field(
        default_factory=list,
        description="Local mode: every node of the fabric (cluster mode: the Node objects).",
    )
    multicast: bool = Field(
        default=False,
        description="Multicast on the primary: the node replicates its pods' group traffic to "
        "the pods and nodes with members (docs/multicast.md).",
    )
    multicast_vni: int = Field(
        default=4243,
        ge=1,
        le=16777215,
        alias="multicastVni",
        description="Native mode with multicast: the VNI of the VXLAN device that carries group "
        "traffic between nodes (VXLAN mode uses the fabric's own).",
    )

    @model_validator(mode="after")
    def _distinct_vnis(self) -> FabricSettings:
        if self.multicast and self.mode == "native" and self.multicast_vni == self.vni:
            raise ValueError("fabric.multicastVni must differ from fabric.vni")
        return self


class DaemonConfig(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid", frozen=True)

    cluster_network: str | None = Field(
        default=None,
        alias="clusterNetwork",
        description="The primary network every pod gets as CNI_IFNAME (eth0): a NAD name in "
        "multusNamespace, 'ns/name', the name of a CNI conf in cniConfDir, or an absolute path to "
        "a conf/conflist file or a directory (first file by name). Unset: the first conf in "
        "cniConfDir other than Plexus's own.",
    )
    default_networks: list[str] = Field(
        default_factory=list,
        alias="defaultNetworks",
        description="Networks attached to every pod outside systemNamespaces, before the ones "
        "the pod asks for (resolved like clusterNetwork).",
    )
    system_namespaces: list[str] = Field(
        default_factory=lambda: ["kube-system"],
        alias="systemNamespaces",
        description="Namespaces whose pods do not get defaultNetworks.",
    )
    multus_namespace: str = Field(
        default="kube-system",
        alias="multusNamespace",
        description="Namespace of the NADs named by clusterNetwork, defaultNetworks and the "
        "v1.multus-cni.io/default-network pod annotation.",
    )
    namespace_isolation: bool = Field(
        default=False,
        alias="namespaceIsolation",
        description="Pods may only use NADs of their own namespace or of globalNamespaces.",
    )
    global_namespaces: list[str] = Field(
        default_factory=list,
        alias="globalNamespaces",
        description="Namespaces whose NADs every pod may use when namespaceIsolation is on "
        "(a list, or a comma-separated string as in Multus). Unset: 'default', as in Multus; "
        "when set, list 'default' too if it should stay global.",
    )
    readiness_indicator_file: str | None = Field(
        default=None,
        validation_alias=AliasChoices("readinessIndicatorFile", "readinessindicatorfile"),
        serialization_alias="readinessIndicatorFile",
        description="If set, STATUS reports 'not ready' and ADD waits until this file exists "
        "(the primary CNI writes it when it is ready).",
    )
    kubeconfig: str | None = Field(
        default=None,
        description="Kubeconfig for the API. Unset: in-cluster credentials when running in a "
        "pod, else no API (local mode needs none).",
    )
    local_dir: str | None = Field(
        default=None,
        alias="localDir",
        description="Local mode: read NADs from the YAML manifests ('---'-separated) in this "
        "directory instead of the API, and pod requests only from the runtime.",
    )
    node_name: str = Field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname(),
        alias="nodeName",
        description="This node's name (pods are watched with spec.nodeName=<it>). Default: "
        "$NODE_NAME, else the host name.",
    )
    state_dir: str = Field(
        default="/var/lib/plexus",
        alias="stateDir",
        description="Durable state: attachment records, quarantine.",
    )
    run_dir: str = Field(
        default="/run/plexus",
        alias="runDir",
        description="Holds the daemon socket plexus.sock (directory 0700, socket 0600).",
    )
    spool_dir: str | None = Field(
        default=None,
        alias="spoolDir",
        description="Where the shim spools DELs while the daemon is down. Default: "
        "<stateDir>/spool.",
    )
    cni_bin_dir: str = Field(
        default="/opt/cni/bin",
        alias="cniBinDir",
        description="Where the shim is installed as 'plexus'.",
    )
    cni_conf_dir: str = Field(
        default="/etc/cni/net.d",
        alias="cniConfDir",
        description=f"Where {CONF_FILE_NAME} is written and where CNI confs named by "
        "clusterNetwork or by NADs without spec.config are looked up.",
    )
    cni_path: list[str] = Field(
        default_factory=lambda: ["/opt/cni/bin", "/usr/lib/cni"],
        alias="cniPath",
        description="Directories searched for external delegate plugins (before the runtime's "
        "CNI_PATH).",
    )
    host_local_data_dir: str = Field(
        default="/var/lib/cni/networks",
        alias="hostLocalDataDir",
        description="Where the in-process host-local IPAM keeps leases when a NAD sets no "
        "dataDir: the reference plugin's own default, so both can share a range.",
    )
    host_local_data_roots: list[str] = Field(
        default_factory=list,
        alias="hostLocalDataRoots",
        description="Directories besides hostLocalDataDir under which a network's host-local "
        "ipam.dataDir may lie, after resolving '..' and symlinks (checked for the in-process "
        "host-local and for every host-local IPAM in a NAD's spec.config, exec'd or not); a "
        "dataDir elsewhere, or a relative one, is refused with code 7.",
    )
    resolv_conf_paths: list[str] = Field(
        default_factory=lambda: list(DEFAULT_RESOLV_CONFS),
        alias="resolvConfPaths",
        description="Files (or directories of files) a host-local ipam.resolvConf may name: "
        "plexusd reads them as root and copies their DNS settings into the result, so any other "
        "path is refused with code 7. Checked like hostLocalDataRoots.",
    )
    fabric: FabricSettings | None = Field(
        default=None,
        description="The routed pod network (plexus-routed): mode native|vxlan, interface, "
        "address, podCIDRs, vni, port, nodes. Config file only.",
    )
    sysfs_root: str = Field(
        default="/sys",
        alias="sysfsRoot",
        description="Where SR-IOV PFs and VFs are read (bus/pci/devices, class/net): the "
        "kernel's /sys, or a tree with the same layout.",
    )
    vf_pools: str | None = Field(
        default=None,
        alias="vfPools",
        description="The node admin's VF pools file (YAML, a top-level 'pools:' list). Unset: "
        "SR-IOV is off in local mode; cluster mode takes VFPools (see vfPoolSource). Edits "
        "take effect within a second, without a restart.",
    )
    vf_pool_source: Literal["auto", "file", "vfpools"] = Field(
        default="auto",
        alias="vfPoolSource",
        description="Where the VF pools come from. file: the vfPools file. vfpools (cluster "
        "mode only): the VFPool objects (plexus.dev/v1alpha1) whose nodeSelector matches this "
        "Node. auto: the vfPools file when it is set (it is an explicit choice, so an upgraded "
        "node keeps its pools), else VFPools in cluster mode, else SR-IOV is off.",
    )
    vf_audit_interval: float = Field(
        default=60.0,
        alias="vfAuditInterval",
        gt=0,
        description="Seconds between audits of every VF against the kernel (location, name, "
        "PF-side settings); one also runs at start before any VF is given out.",
    )
    device_plugin_dir: str = Field(
        default="/var/lib/kubelet/device-plugins",
        alias="devicePluginDir",
        description="Cluster mode: kubelet's device-plugin directory (kubelet.sock), where one "
        "device plugin per VF pool registers.",
    )
    pod_resources_socket: str = Field(
        default="/var/lib/kubelet/pod-resources/kubelet.sock",
        alias="podResourcesSocket",
        description="Cluster mode: kubelet's PodResources API, asked which VFs a pod was granted.",
    )
    install: bool = Field(
        default=True,
        description=f"Install the shim and write {CONF_FILE_NAME} at start.",
    )
    shim_binary: str | None = Field(
        default=None,
        alias="shimBinary",
        description="The compiled static shim to install as 'plexus'. Default: the one shipped "
        "in the package (metaplugin/bin/plexus, built by `make shim`).",
    )
    shim_interpreter: str = Field(
        default="/usr/bin/python3",
        alias="shimInterpreter",
        description="Only when no compiled shim was built (a development checkout): the "
        "interpreter in the Python shim's shebang (run with -IS: isolated, no site-packages).",
    )
    shim_timeout: float = Field(
        default=120.0,
        alias="shimTimeout",
        gt=0,
        le=86400,  # = the shim's MAX_TIMEOUT: it ignores a larger (or infinite) deadline
        description="Seconds the shim waits for the daemon's answer before giving up.",
    )
    delegate_timeout: float = Field(
        default=60.0,
        alias="delegateTimeout",
        gt=0,
        description="Seconds an external delegate may run before it is killed.",
    )
    max_concurrent: int = Field(
        default=8,
        alias="maxConcurrent",
        ge=1,
        description="Containers handled at the same time (one operation per container at a time).",
    )
    max_queue: int = Field(
        # A node's whole pod capacity at once (kubelet's default maxPods, 110) and their DELs
        # must queue, not fail: 64 refused 38 of a 110-pod burst with code 11.
        default=160,
        alias="maxQueue",
        ge=0,
        description="Requests allowed to wait beyond maxConcurrent; more get CNI code 11.",
    )
    max_attachments_per_pod: int = Field(
        default=32,
        alias="maxAttachmentsPerPod",
        ge=1,
        description="Attachments (interfaces) one pod may get, counting the cluster network and "
        "defaultNetworks; a pod that asks for more is refused with code 7 before anything is "
        "made.",
    )
    policy_enforcement: bool = Field(
        default=True,
        alias="policyEnforcement",
        description="Enforce NetworkPolicy (primary), MultiNetworkPolicy (secondaries) and the "
        "plexus.dev isolation modes with one nftables table in each local pod's netns "
        "(docs/policy.md). Off: no table is made or changed.",
    )
    cri_socket: str | None = Field(
        default=None,
        alias="criSocket",
        description="Local mode: the container runtime's CRI socket (e.g. "
        "/run/containerd/containerd.sock), asked for a pod's labels (PodSandboxStatus) so "
        "policies can select it. Unset: local pods have no labels.",
    )
    metrics_address: str = Field(
        # 9465, and the controller 9466: clear of the common exporters' ports (docs/metrics.md).
        default=":9465",
        alias="metricsAddress",
        description="[host]:port serving Prometheus metrics at GET /metrics over TCP (the "
        "DaemonSet runs in the host network: every node address); empty turns it off. The "
        "unix socket serves /metrics too, for plexusctl.",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", alias="logLevel", description="Log level."
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        alias="logFormat",
        description="json for production, console (key=value) for a terminal; auto picks by "
        "whether stderr is a terminal.",
    )

    @field_validator(
        "global_namespaces",
        "system_namespaces",
        "default_networks",
        "host_local_data_roots",
        "resolv_conf_paths",
        mode="before",
    )
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        # Multus writes globalNamespaces as "a,b"; accept both forms everywhere.
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("metrics_address")
    @classmethod
    def _metrics_address(cls, value: str) -> str:
        _host, sep, port = value.rpartition(":")
        if value and (not sep or not port.isdigit() or not 0 <= int(port) <= 65535):
            raise ValueError(f"metricsAddress {value!r} is not [host]:port (e.g. :9465)")
        return value

    @field_validator("run_dir")
    @classmethod
    def _own_run_dir(cls, value: str) -> str:
        # runDir is chmod'ed 0700 to keep the socket private: never a directory others share.
        if str(Path(value).resolve()) in _SHARED_DIRS:
            raise ValueError(
                f"runDir {value} is shared with others; give plexusd its own "
                "directory such as /run/plexus"
            )
        return value

    @field_validator("host_local_data_roots", "resolv_conf_paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        # Relative entries would be resolved against plexusd's working directory: never meant.
        relative = [v for v in value if not os.path.isabs(v)]
        if relative:
            raise ValueError(f"{', '.join(relative)}: give absolute paths")
        return value

    @model_validator(mode="after")
    def _pool_source_fits(self) -> DaemonConfig:
        if self.vf_pool_source == "file" and self.vf_pools is None:
            raise ValueError("vfPoolSource is file but no vfPools file is set")
        if self.vf_pool_source == "vfpools" and self.local:
            raise ValueError(
                "vfPoolSource vfpools needs the Kubernetes API: local mode reads a vfPools file"
            )
        return self

    @property
    def local(self) -> bool:
        return self.local_dir is not None

    @property
    def pools_from(self) -> Literal["file", "vfpools"] | None:
        """Where this daemon takes its VF pools from; None: SR-IOV is off."""
        if self.vf_pool_source == "vfpools" or (
            self.vf_pool_source == "auto" and self.vf_pools is None and not self.local
        ):
            return "vfpools"
        return "file" if self.vf_pools is not None else None

    @property
    def socket_path(self) -> str:
        return str(Path(self.run_dir) / SOCKET_NAME)

    @property
    def spool_path(self) -> str:
        return self.spool_dir or str(Path(self.state_dir) / "spool")

    @property
    def conf_file(self) -> str:
        return str(Path(self.cni_conf_dir) / CONF_FILE_NAME)

    def ipam_paths(self) -> IpamPaths:
        """Where host-local may write (hostLocalDataDir is always allowed) and read."""
        return IpamPaths(
            data_roots=(self.host_local_data_dir, *self.host_local_data_roots),
            resolv_confs=tuple(self.resolv_conf_paths),
        )


def load_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InvalidConfig(f"cannot read daemon config {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)  # YAML is a superset of JSON: one loader for both
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"daemon config {path} is neither YAML nor JSON: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidConfig(f"daemon config {path} must be a mapping of keys to values")
    return data


def build(values: dict[str, Any], *, source: str = "daemon config") -> DaemonConfig:
    try:
        return DaemonConfig.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidConfig(f"{source} is invalid: {problems}") from None


# --- command line -----------------------------------------------------------------------------


def _flag(alias: str) -> str:
    out = "".join("-" + c.lower() if c.isupper() else c for c in alias)
    return "--" + out


def _key_of(name: str) -> str:
    field = DaemonConfig.model_fields[name]
    if field.alias:
        return field.alias
    if field.serialization_alias:
        return field.serialization_alias
    return name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config key (--state-dir for stateDir, ...); flags override the file."""
    parser.add_argument("--config", metavar="FILE", help="daemon config file (YAML or JSON)")
    parser.add_argument(
        "--local", metavar="DIR", dest="localDir", help="local mode; shorthand for localDir"
    )
    for name, field in DaemonConfig.model_fields.items():
        key = _key_of(name)
        if key == "localDir":
            continue
        help_text = f"{field.description} [config key: {key}]"
        annotation = field.annotation
        if key == "fabric":
            continue  # a structured key: config file only
        if annotation is bool:
            parser.add_argument(
                _flag(key), dest=key, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif annotation == list[str]:
            parser.add_argument(
                _flag(key),
                dest=key,
                metavar="A,B",
                help=help_text,
                type=lambda s: [v for v in s.replace(os.pathsep, ",").split(",") if v],
            )
        else:
            parser.add_argument(_flag(key), dest=key, metavar="VALUE", help=help_text)


def from_args(ns: argparse.Namespace) -> DaemonConfig:
    values: dict[str, Any] = load_file(ns.config) if ns.config else {}
    for name in DaemonConfig.model_fields:
        key = _key_of(name)
        override = getattr(ns, key, None)
        if override is not None:
            # A flag replaces the file's key, whichever alias the file used.
            for alias in (key, name, key.lower()):
                values.pop(alias, None)
            values[key] = override
    return build(values, source=f"daemon config {ns.config}" if ns.config else "daemon flags")


def keys_help() -> str:
    lines = ["config keys (file, camelCase; each also a --kebab-case flag):"]
    for name, field in DaemonConfig.model_fields.items():
        lines.append(f"  {_key_of(name)}: {field.description}")
    return "\n".join(lines)
