"""NetworkAttachmentDefinitions (NPWG v1.3 §3): the model, manifests read from YAML, and the
network config each NAD stands for.

`network_config()` turns a NAD into the CNI config to delegate to (NPWG §3.4: spec.config, else
a conf file of that name; `name` injected). The node daemon reads NADs through its sources
(`metaplugin.nad_source`, `metaplugin.k8s`); `plexusctl validate` and the cluster controller
validate them with the same functions, without importing the daemon.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cnispec import confdir, jsontext
from cnispec.annotations import RESOURCE_NAME_ANNOTATION
from cnispec.errors import InvalidConfig

GROUP: Final = "k8s.cni.cncf.io"
VERSION: Final = "v1"
PLURAL: Final = "network-attachment-definitions"
KIND: Final = "NetworkAttachmentDefinition"
API_VERSION: Final = f"{GROUP}/{VERSION}"


class NetworkAttachmentDefinition(BaseModel):
    model_config = ConfigDict(frozen=True)

    namespace: str
    name: str
    config: str = ""
    annotations: dict[str, str] = Field(default_factory=dict)
    uid: str = ""
    resource_version: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def resource_name(self) -> str | None:
        return self.annotations.get(RESOURCE_NAME_ANNOTATION)

    @classmethod
    def from_object(
        cls, obj: Mapping[str, Any], *, default_namespace: str = "default"
    ) -> NetworkAttachmentDefinition:
        if obj.get("kind") != KIND:
            raise InvalidConfig(f"kind is {obj.get('kind')!r}, expected {KIND}")
        meta = _mapping(obj.get("metadata"), "metadata")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidConfig(f"{KIND} without metadata.name")
        spec = _mapping(obj.get("spec"), f"{KIND} {name}: spec")
        config = spec.get("config", "")
        if not isinstance(config, str):
            raise InvalidConfig(f"{KIND} {name}: spec.config must be a string holding JSON")
        annotations = dict(_mapping(meta.get("annotations"), f"{KIND} {name}: annotations"))
        strings = {key: meta.get(key) or "" for key in ("namespace", "uid", "resourceVersion")}
        # Strings only, as Kubernetes has them: str() of any YAML value could be anything (a
        # structure of aliases renders to gigabytes).
        if not all(
            isinstance(v, str) for v in [*annotations, *annotations.values(), *strings.values()]
        ):
            raise InvalidConfig(
                f"{KIND} {name}: metadata.namespace, uid, resourceVersion and annotations must "
                "be strings"
            )
        try:
            return cls(
                namespace=strings["namespace"] or default_namespace,
                name=name,
                config=config,
                annotations=annotations,
                uid=strings["uid"],
                resource_version=strings["resourceVersion"],
            )
        except ValidationError as exc:  # a model rule the checks above do not cover
            raise InvalidConfig(f"{KIND} {name}: {exc.errors()[0]['msg']}") from None


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidConfig(f"{what} must be a mapping")
    return value


def network_config(nad: NetworkAttachmentDefinition, conf_dir: str) -> dict[str, Any]:
    """The CNI config a NAD delegates to: spec.config, else the conf in conf_dir with that name
    (NPWG §3.4.1); a config without `name` gets the NAD's name (§3.4.2)."""
    if nad.config.strip():
        try:
            config = jsontext.loads(nad.config)
        except ValueError as exc:
            raise InvalidConfig(f"{KIND} {nad.key}: spec.config is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise InvalidConfig(f"{KIND} {nad.key}: spec.config must be a JSON object")
        config.setdefault("name", nad.name)
        return config
    found = confdir.find_by_name(conf_dir, nad.name)
    if found is None:
        raise InvalidConfig(
            f"{KIND} {nad.key} has no spec.config and {conf_dir} holds no CNI config named "
            f"{nad.name!r}",
        )
    return found[1]


# A NAD manifest expands to a few dozen YAML nodes; aliases can make a few hundred bytes expand to
# billions ("billion laughs": +78 MiB per reload of one such file was measured). Refuse a
# document whose aliases would expand past this many nodes.
MAX_EXPANDED_NODES: Final = 50_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (shared nodes counted once
    per use, computed once each, so the count itself costs linear time)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias refers back here: count it once, not for ever
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        total = 1
    sizes[id(node)] = total
    return total


# libyaml's parser reads a manifest ~10x faster than PyYAML's own (10,000 NADs: 0.4 s, not 4 s);
# PyYAML's wheels ship it, the pure-Python one is the fallback.
_Loader: Final[Any] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_yaml_documents(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream (safe types only), refusing alias bombs and nesting
    too deep to parse."""
    try:
        loader = _Loader(text)  # reads the stream: a non-printable character fails here
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"{source}: not valid YAML: {exc}") from None
    except UnicodeEncodeError as exc:  # libyaml takes UTF-8: a lone surrogate is not
        raise InvalidConfig(
            f"{source}: not valid YAML: unacceptable character #x{ord(text[exc.start]):04x}"
        ) from None
    documents: list[Any] = []
    aliases = "*" in text
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            # Only an alias (`*name`) expands: a stream without one is as big as it reads.
            size = _expanded_size(node, {}) if aliases else 0
            if size > MAX_EXPANDED_NODES:
                raise InvalidConfig(
                    f"{source}: document {len(documents)} expands to {size} YAML nodes through "
                    f"aliases (at most {MAX_EXPANDED_NODES}); write it out without anchors"
                )
            documents.append(loader.construct_document(node))
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml's own limit (1000 levels)
            raise InvalidConfig(f"{source}: YAML nested too deeply") from None
        raise InvalidConfig(f"{source}: not valid YAML: {exc}") from None
    except RecursionError:
        raise InvalidConfig(f"{source}: YAML nested too deeply") from None
    finally:
        loader.dispose()
    return documents


def parse_manifests(text: str, source: str) -> list[NetworkAttachmentDefinition]:
    """NADs from a YAML stream (`---`-separated documents; other kinds are skipped)."""
    documents = load_yaml_documents(text, source)
    out = []
    for i, doc in enumerate(documents):
        if doc is None:
            continue
        if not isinstance(doc, dict):
            raise InvalidConfig(f"{source}: document {i} is not a mapping")
        if doc.get("kind") != KIND:
            continue
        try:
            out.append(NetworkAttachmentDefinition.from_object(doc))
        except InvalidConfig as exc:
            raise InvalidConfig(f"{source}: document {i}: {exc.msg}") from None
    return out
