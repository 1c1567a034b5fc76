"""Checks a NetworkAttachmentDefinition or a pod's network annotations before any pod fails on
them: the library behind the controller's admission webhook (`nad_controller.webhook`) and
`plexusctl validate`, which therefore give the same verdicts. It lives on the ground floor
because both the controller and the node's CLI call it, and neither may import the other.

Pure: what needs the Kubernetes API (does a NAD exist, which resources VFPools provide, a
namespace's labels) is asked through `Lookups`; without one (no API connection) those checks are
skipped and said to be (a warning), every other check still runs. Each problem names where
(`metadata.name`, `spec.config: plugins[0].ipam`, the annotation) and why. docs/validation.md
lists every check.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import yaml
from pydantic import BaseModel, ValidationError

from cnispec import jsontext
from cnispec.annotations import (
    DEFAULT_NETWORK_ANNOTATION,
    NETWORKS_ANNOTATION,
    RESOURCE_NAME_ANNOTATION,
    NetworkSelection,
    parse_networks,
)
from cnispec.builtin_conf import IPAM_TYPES, MODELS
from cnispec.builtin_conf.ipam import (
    HostLocalConf,
    StaticConf,
    build_range_sets,
    parse_routes,
    static_address,
)
from cnispec.errors import InvalidConfig, PlexusError
from cnispec.nad import KIND as NAD_KIND
from cnispec.nad import load_yaml_documents
from cnispec.netconf import NetworkConfigList
from cnispec.vfpools import resource_name_problem
from cnispec.yamllines import line_of

# A namespace labelled so admits a pod that names a NAD not (yet) there, with a warning: the
# pod's networks are resolved when its sandbox is made, so a NAD applied just after it works.
ALLOW_MISSING_LABEL: Final = "plexus.dev/allow-missing-networks"
# A namespace labelled `plexus.dev/isolation: namespace` neither uses another namespace's NADs
# nor lends its own to another namespace's pods (issue 14's policy isolation reads the same).
ISOLATION_LABEL: Final = "plexus.dev/isolation"
ISOLATED: Final = "namespace"

Loc = tuple[str | int, ...]

# Kubernetes's IsDNS1123Subdomain (apimachinery validation): at most 253 characters, labels of
# lower-case alphanumerics and '-', separated by '.', each starting and ending alphanumeric.
# Kubernetes sets no per-label length within a subdomain, so neither does this.
_SUBDOMAIN_MAX: Final = 253
_ALNUM: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")


def dns1123_subdomain_problem(name: str) -> str:
    """What keeps `name` from being a DNS-1123 subdomain as Kubernetes checks it ('' if none)."""
    if not name:
        return "must not be empty"
    if len(name) > _SUBDOMAIN_MAX:
        return f"is {len(name)} characters long; at most {_SUBDOMAIN_MAX} are allowed"
    for label in name.split("."):
        if not label:
            return "has an empty label ('..', or a leading or trailing '.')"
        bad = sorted({c for c in label if c not in _ALNUM and c != "-"})
        if bad:
            return f"has {''.join(bad)!r}: only lower-case letters, digits, '-' and '.' are allowed"
        if label[0] == "-" or label[-1] == "-":
            return f"has label {label!r}: each label must start and end with a letter or digit"
    return ""


@dataclass(frozen=True, slots=True)
class Problem:
    at: Loc
    reason: str

    def __str__(self) -> str:
        return f"{loc_text(self.at)}: {self.reason}" if self.at else self.reason


def loc_text(at: Loc) -> str:
    """`spec.config` then, inside the JSON config, `plugins[0].ipam` after a colon."""
    outer = at[:2] if at[:2] == ("spec", "config") else at
    text = _path(outer)
    if len(at) > len(outer):
        text += ": " + _path(at[len(outer) :])
    return text


def _path(parts: Loc) -> str:
    """`plugins[0].ipam`; a key that has '.' or '/' in brackets: `annotations[k8s.v1.../x]`."""
    text = "".join(
        f"[{p}]" if isinstance(p, int) or "." in p or "/" in p else f".{p}" for p in parts
    )
    return text.lstrip(".")


@dataclass(slots=True)
class Verdict:
    """What the checks say of one object: refused when there is any error; warnings are shown
    to the user (kubectl prints them) and do not refuse."""

    subject: str
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.errors

    def message(self) -> str:
        return f"{self.subject}: " + "; ".join(str(e) for e in self.errors)


class LookupUnavailable(Exception):
    """The API could not answer a lookup: the check is skipped with a warning (fail open for
    references; everything checkable without the API is still checked)."""


class Lookups(Protocol):
    """What the checks ask the Kubernetes API (`nad_controller.k8s_lookups` implements it)."""

    def pool_resource_names(self) -> frozenset[str]:
        """The resourceName of every VFPool."""
        ...

    def nad_exists(self, namespace: str, name: str) -> bool: ...

    def namespace_labels(self, namespace: str) -> Mapping[str, str]: ...


# --- NetworkAttachmentDefinition ----------------------------------------------------------


ConfigResolver = Callable[[str], Mapping[str, Any] | None]


def check_nad(
    obj: Mapping[str, Any],
    *,
    lookups: Lookups | None = None,
    conf_for_empty: ConfigResolver | None = None,
) -> Verdict:
    """A NAD as the API would store it. `conf_for_empty` finds the node-local CNI config a NAD
    without spec.config stands for (NPWG §3.4.1; `plexusctl validate --cni-conf-dir`); without
    it such a NAD is admitted with a warning, as only the nodes can see that file."""
    meta = _meta(obj)
    name, namespace = (
        str(v) if isinstance(v := meta.get(k), str) else "" for k in ("name", "namespace")
    )
    verdict = Verdict(f"{NAD_KIND} {namespace + '/' if namespace else ''}{name or '?'}")
    problem = dns1123_subdomain_problem(name) if name or not meta.get("generateName") else ""
    if problem:
        verdict.errors.append(
            Problem(("metadata", "name"), f"{name!r} is not a DNS-1123 subdomain: {problem}")
        )
    # A config without `name` takes the NAD's; a bad NAD name is reported once, above.
    config_name = "nad" if problem or not name else name
    spec = obj.get("spec")
    if spec is not None and not isinstance(spec, Mapping):
        verdict.errors.append(Problem(("spec",), "must be an object"))
        return verdict
    config = (spec or {}).get("config", "")
    if not isinstance(config, str):
        verdict.errors.append(Problem(("spec", "config"), "must be a string holding JSON"))
    elif config.strip():
        verdict.errors += check_config_text(config, config_name)
    elif conf_for_empty is not None:
        found = conf_for_empty(name)
        if found is None:
            verdict.errors.append(
                Problem(("spec", "config"), f"is empty and no CNI config named {name!r} is there")
            )
        else:
            verdict.errors += check_config(dict(found), config_name)
    else:
        verdict.warnings.append(
            Problem(
                ("spec", "config"),
                f"is empty: every node must have a CNI config named {name!r} in its conf dir "
                "(not checked here)",
            )
        )
    _check_resource_name(meta, verdict, lookups)
    return verdict


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _check_resource_name(
    meta: Mapping[str, Any], verdict: Verdict, lookups: Lookups | None
) -> None:
    annotations = meta.get("annotations")
    if not isinstance(annotations, Mapping) or RESOURCE_NAME_ANNOTATION not in annotations:
        return
    at: Loc = ("metadata", "annotations", RESOURCE_NAME_ANNOTATION)
    value = annotations[RESOURCE_NAME_ANNOTATION]
    problem = resource_name_problem(value) if isinstance(value, str) else "is not a string"
    if problem:
        verdict.errors.append(Problem(at, f"{value!r} {problem}"))
        return
    if lookups is None:
        verdict.warnings.append(
            Problem(at, f"{value!r}: no API to check that a VFPool provides it")
        )
        return
    try:
        provided = lookups.pool_resource_names()
    except LookupUnavailable as exc:
        verdict.warnings.append(Problem(at, f"{value!r}: VFPools could not be listed ({exc})"))
        return
    if value not in provided:
        known = ", ".join(sorted(provided)) or "none"
        verdict.errors.append(
            Problem(at, f"no VFPool provides resource {value!r} (VFPools provide: {known})")
        )


def check_config_text(text: str, nad_name: str) -> list[Problem]:
    at: Loc = ("spec", "config")
    try:
        config = jsontext.loads(text)
    except ValueError as exc:
        return [Problem(at, f"is not valid JSON: {exc}")]
    if not isinstance(config, dict):
        return [Problem(at, f"must be a JSON object, not {type(config).__name__}")]
    return check_config(config, nad_name)


def check_config(config: dict[str, Any], nad_name: str) -> list[Problem]:
    """A conf or conflist; a config without `name` takes the NAD's (NPWG §3.4.2), as the node
    does. Each built-in plugin's keys are checked with the delegate's own model."""
    at: Loc = ("spec", "config")
    config = {**config, "name": config.get("name", nad_name)}
    try:
        net = NetworkConfigList.parse(config)
    except PlexusError as exc:
        return [Problem(at, exc.msg)]
    where = "plugins" in config
    problems: list[Problem] = []
    for i, plugin in enumerate(net.plugins):
        plugin_at: Loc = (*at, "plugins", i) if where else at
        problems += check_plugin(dict(plugin), net.name, plugin_at)
    return problems


def check_plugin(plugin: dict[str, Any], network: str, at: Loc) -> list[Problem]:
    kind = str(plugin["type"])
    if not kind.startswith("plexus-"):
        return []  # exec'd from the CNI path on the node: its keys are that binary's business
    model = MODELS.get(kind)
    if model is None:
        known = ", ".join(sorted(MODELS))
        return [Problem((*at, "type"), f"{kind!r} is no built-in of Plexus (they are: {known})")]
    problems = _model_problems(model, {**plugin, "name": network}, at)
    if plugin.get("linkInContainer"):
        problems.append(Problem((*at, "linkInContainer"), "is not supported by any built-in"))
    return problems + check_ipam(plugin, at)


def check_ipam(plugin: Mapping[str, Any], at: Loc) -> list[Problem]:
    """The in-process IPAM's config (host-local ranges, static addresses), as ADD would read
    it; an IPAM of another type is exec'd on the node and not checked here."""
    if "ipam" not in plugin:
        return []
    ipam, ipam_at = plugin["ipam"], (*at, "ipam")
    if not isinstance(ipam, Mapping) or not isinstance(ipam.get("type"), str) or not ipam["type"]:
        return [Problem(ipam_at, "must be an object with a string 'type'")]
    if ipam["type"] not in IPAM_TYPES:
        return []
    try:
        if ipam["type"] == "static":
            _check_static(ipam)
        else:
            _check_host_local(ipam, plugin.get("capabilities"))
    except ValidationError as exc:
        return _describe(exc, ipam_at)
    except InvalidConfig as exc:
        return [Problem(ipam_at, exc.msg.removeprefix("ipam "))]
    return []


def _check_static(ipam: Mapping[str, Any]) -> None:
    static = StaticConf.model_validate(ipam)
    for i, address in enumerate(static.addresses):
        static_address(address.address, address.gateway, what=f"addresses[{i}]")
    parse_routes(static.routes, what="routes")


def _check_host_local(ipam: Mapping[str, Any], capabilities: Any) -> None:
    conf = HostLocalConf.model_validate(ipam)
    sets = conf.configured_range_sets()
    by_runtime = isinstance(capabilities, Mapping) and capabilities.get("ipRanges")
    if sets or not by_runtime:  # the ipRanges capability may bring every range at ADD
        build_range_sets(sets)
    parse_routes(conf.routes, what="routes")


def _model_problems(model: type[BaseModel], data: dict[str, Any], at: Loc) -> list[Problem]:
    try:
        model.model_validate(data)
    except ValidationError as exc:
        return _describe(exc, at)
    return []


def _describe(exc: ValidationError, at: Loc) -> list[Problem]:
    out = []
    for err in exc.errors(include_url=False):
        reason = str(err["msg"]).removeprefix("Value error, ")
        given = err.get("input")
        if err["loc"] and (isinstance(given, str | int | float | bool) or given is None):
            reason += f" (got {given!r})"
        out.append(Problem((*at, *err["loc"]), reason))
    return out


# --- pods ---------------------------------------------------------------------------------------


def check_pod(
    obj: Mapping[str, Any], *, namespace: str = "", lookups: Lookups | None = None
) -> Verdict:
    """A pod's `k8s.v1.cni.cncf.io/networks` and `v1.multus-cni.io/default-network`: parsed
    with the node's parser (so a pod refused here is one the node would fail), every NAD named
    exists, and no reference crosses an isolated namespace."""
    meta = _meta(obj)
    namespace = namespace or str(meta.get("namespace") or "default")
    name = str(meta.get("name") or meta.get("generateName") or "?")
    verdict = Verdict(f"Pod {namespace}/{name}")
    annotations = meta.get("annotations")
    if not isinstance(annotations, Mapping):
        return verdict
    for key in (NETWORKS_ANNOTATION, DEFAULT_NETWORK_ANNOTATION):
        value = annotations.get(key)
        if value is None:
            continue
        at: Loc = ("metadata", "annotations", key)
        try:
            selections = parse_networks(value) if isinstance(value, str) else None
        except InvalidConfig as exc:
            reason = exc.msg.removeprefix(f"pod annotation {NETWORKS_ANNOTATION}: ")
            verdict.errors.append(Problem(at, reason))
            continue
        if selections is None:
            verdict.errors.append(Problem(at, "is not a string"))
            continue
        if key == DEFAULT_NETWORK_ANNOTATION and len(selections) != 1:
            verdict.errors.append(
                Problem(at, f"must name exactly one network, not {len(selections)}")
            )
            continue
        _check_references(selections, namespace, at, verdict, lookups)
    return verdict


def _check_references(
    selections: list[NetworkSelection],
    namespace: str,
    at: Loc,
    verdict: Verdict,
    lookups: Lookups | None,
) -> None:
    if lookups is None:
        if selections:
            verdict.warnings.append(Problem(at, "no API: the NADs it names were not looked up"))
        return
    try:
        own = lookups.namespace_labels(namespace)
        for sel in selections:
            ref = sel.reference(namespace)
            target = sel.namespace or namespace
            if target != namespace:
                problem = _isolation_problem(namespace, own, target, lookups)
                if problem:
                    verdict.errors.append(Problem(at, f"{ref}: {problem}"))
                    continue
            if lookups.nad_exists(target, sel.name):
                continue
            missing = f"{ref}: no {NAD_KIND} {sel.name!r} in namespace {target!r}"
            if own.get(ALLOW_MISSING_LABEL) == "true":
                verdict.warnings.append(
                    Problem(
                        at,
                        f"{missing} yet (admitted: namespace {namespace} has "
                        f"{ALLOW_MISSING_LABEL}=true; the pod's sandbox fails until it exists)",
                    )
                )
            else:
                verdict.errors.append(Problem(at, missing))
    except LookupUnavailable as exc:
        verdict.warnings.append(Problem(at, f"the NADs it names could not be looked up ({exc})"))


def _isolation_problem(
    namespace: str, own: Mapping[str, str], target: str, lookups: Lookups
) -> str:
    if own.get(ISOLATION_LABEL) == ISOLATED:
        return (
            f"namespace {namespace} has {ISOLATION_LABEL}={ISOLATED}: its pods may use only "
            "its own NADs"
        )
    if lookups.namespace_labels(target).get(ISOLATION_LABEL) == ISOLATED:
        return (
            f"namespace {target} has {ISOLATION_LABEL}={ISOLATED}: its NADs serve only its own pods"
        )
    return ""


def check_object(
    obj: Mapping[str, Any],
    *,
    namespace: str = "",
    lookups: Lookups | None = None,
    conf_for_empty: ConfigResolver | None = None,
) -> Verdict | None:
    """The checks for `obj`'s kind; None for a kind Plexus does not check."""
    kind = obj.get("kind")
    if kind == NAD_KIND:
        return check_nad(obj, lookups=lookups, conf_for_empty=conf_for_empty)
    if kind == "Pod":
        return check_pod(obj, namespace=namespace, lookups=lookups)
    return None


# --- manifest files (plexusctl validate) -----------------------------------------------------

# Kinds whose pod template carries the pods' annotations (spec.template).
_WORKLOADS: Final = frozenset(
    {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "ReplicationController"}
)


@dataclass(slots=True)
class DocumentVerdict:
    """One document of a manifest file: its kind and line, and each problem with its line."""

    line: int
    kind: str
    verdict: Verdict | None  # None: a kind Plexus does not check
    errors: list[tuple[int, Problem]] = field(default_factory=list)
    warnings: list[tuple[int, Problem]] = field(default_factory=list)


def check_manifests(
    text: str,
    source: str,
    *,
    lookups: Lookups | None = None,
    conf_for_empty: ConfigResolver | None = None,
) -> list[DocumentVerdict]:
    """Every document of a YAML stream, with `file:line` for each problem. Raises
    InvalidConfig (with the line) when the text is not YAML or a document not an object."""
    out = []
    for node, doc in _documents(text, source):
        line = node.start_mark.line + 1
        if not isinstance(doc, dict):
            raise InvalidConfig(f"{source}:{line}: the document is not an object")
        kind = str(doc.get("kind") or "?")
        prefix: Loc = ()
        verdict = check_object(doc, lookups=lookups, conf_for_empty=conf_for_empty)
        template = (
            doc.get("spec", {}).get("template") if isinstance(doc.get("spec"), dict) else None
        )
        if verdict is None and kind in _WORKLOADS and isinstance(template, dict):
            namespace = str(_meta(doc).get("namespace") or "default")
            verdict = check_pod(template, namespace=namespace, lookups=lookups)
            verdict.subject = f"{kind} {namespace}/{_meta(doc).get('name', '?')} (pod template)"
            prefix = ("spec", "template")
        found = DocumentVerdict(line, kind, verdict)
        if verdict is not None:
            found.errors = sorted(
                ((line_of(node, (*prefix, *p.at)), p) for p in verdict.errors), key=_first
            )
            found.warnings = sorted(
                ((line_of(node, (*prefix, *p.at)), p) for p in verdict.warnings), key=_first
            )
        out.append(found)
    return out


def _first(item: tuple[int, Problem]) -> int:
    return item[0]


def _documents(text: str, source: str) -> list[tuple[yaml.Node, Any]]:
    """Each document's node tree (for lines) and data, read as the node daemon reads NAD
    files (`cnispec.nad.load_yaml_documents`: safe types, alias bombs refused)."""
    data = load_yaml_documents(text, source)
    loader = yaml.SafeLoader(text)
    try:
        nodes = []
        while loader.check_node():
            node = loader.get_node()
            if node is not None:
                nodes.append(node)
    finally:
        loader.dispose()
    return [(n, d) for n, d in zip(nodes, data, strict=True) if d is not None]
