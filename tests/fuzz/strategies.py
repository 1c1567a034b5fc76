"""Hypothesis strategies for what reaches Plexus from outside: CNI_* environment values (text
and bytes-ish junk), network configs with runtimeConfig and prevResult, the pod annotations in
both forms, NAD manifests, and the shim's request envelope.

Each strategy mixes the valid shape (so the fuzzer gets deep into ADD, DEL and rollback) with
junk at every level: a valid value, a near miss (one byte too long, a '/' in a name) and noise
(any text, lone surrogates, NUL, U+FFFD, bytes that are not UTF-8, JSON nested thousands deep).
"""

from __future__ import annotations

import json
import string
from typing import Any

import yaml
from hypothesis import strategies as st

from cnispec import cni

NETNS = "/proc/self/ns/net"
POD_ANNOTATIONS = "io.kubernetes.cri.pod-annotations"
NETWORKS = "k8s.v1.cni.cncf.io/networks"
DEFAULT_NETWORK = "v1.multus-cni.io/default-network"

# --- building blocks ----------------------------------------------------------------------------

# Text as os.environ hands it to the Python shim: bytes that are not UTF-8 become lone
# surrogates (surrogateescape); a replacing decoder would leave U+FFFD instead.
environ_text = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
replaced_text = st.binary(max_size=40).map(lambda b: b.decode("utf-8", "replace"))
any_text = st.text(st.characters(codec=None), max_size=40)  # includes surrogates and NUL
sprinkles = st.sampled_from(["\x00", "\ufffd", "\udcff", "\ud800", "\n", "/", ":", " ", ".."])


def rare(draw: st.DrawFn, in_ten: int) -> bool:
    """True about `in_ten` times in ten. Hypothesis favours zero choices while it generates
    (and shrinks towards them), so the zero choice is always the common path here."""
    return draw(st.integers(0, 9)) >= 10 - in_ten


@st.composite
def spoiled(draw: st.DrawFn, good: st.SearchStrategy[str]) -> str:
    """A good value with one odd character put somewhere in it."""
    value = draw(good)
    at = draw(st.integers(0, len(value)))
    return value[:at] + draw(sprinkles) + value[at:]


def junk(*near: str) -> st.SearchStrategy[str]:
    """Noise for a text field: a near miss when given, else any text, environ bytes, U+FFFD."""
    noise = st.one_of(environ_text, replaced_text, any_text)
    return st.one_of(st.sampled_from(near), noise) if near else noise


@st.composite
def _mostly(
    draw: st.DrawFn, good: st.SearchStrategy[str], bad: st.SearchStrategy[str], in_ten: int = 3
) -> str:
    if not rare(draw, in_ten):
        return draw(good)
    return draw(spoiled(good)) if rare(draw, 3) else draw(bad)


def junk_or(good: st.SearchStrategy[str], *near: str, in_ten: int = 3) -> st.SearchStrategy[str]:
    """Mostly `good`, else (`in_ten` times in ten) the good value spoiled, a near miss or
    noise."""
    return _mostly(good, junk(*near), in_ten)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)


def deep_json(depth_min: int = 60, depth_max: int = 5000) -> st.SearchStrategy[str]:
    """Arrays and objects nested around and far past the decoder's bound."""

    @st.composite
    def build(draw: st.DrawFn) -> str:
        depth = draw(st.integers(depth_min, depth_max))
        kind = draw(st.sampled_from(["array", "object", "open", "mixed"]))
        if kind == "array":
            return "[" * depth + "]" * depth
        if kind == "object":
            return '{"a":' * depth + "1" + "}" * depth
        if kind == "open":
            return "[" * depth
        return '[{"a":' * (depth // 2) + "[]" + "}]" * (depth // 2)

    return build()


# --- the CNI environment ------------------------------------------------------------------------

good_container_ids = st.one_of(
    st.just("c1"),
    st.text(string.hexdigits.lower(), min_size=64, max_size=64),
    st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,40}", fullmatch=True),
    st.integers(cni.MAX_CONTAINER_ID - 2, cni.MAX_CONTAINER_ID).map(lambda n: "a" * n),
)
container_ids = junk_or(good_container_ids)
good_ifnames = st.sampled_from(["eth0", "eth0", "net1", "eth1", "a" * 15])
ifnames = junk_or(good_ifnames)
pod_names = junk_or(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True))


@st.composite
def k8s_args(draw: st.DrawFn, valid: bool = False) -> str:
    text = (lambda good: good) if valid else junk_or
    pairs = {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": draw(text(st.just("default"))),
        "K8S_POD_NAME": draw(
            text(st.from_regex(r"[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?", fullmatch=True))
        ),
        "K8S_POD_UID": draw(text(st.uuids().map(str))),
        "K8S_POD_INFRA_CONTAINER_ID": draw(text(good_container_ids)),
    }
    keep = draw(st.lists(st.sampled_from(list(pairs)), unique=True))
    return ";".join(f"{k}={pairs[k]}" for k in keep or pairs)


GOOD_COMMANDS = ["ADD", "ADD", "ADD", "ADD", "DEL", "DEL", "CHECK", "STATUS", "GC", "VERSION"]
# Each CNI_* variable: (a good value, junk for it). A case spoils none, one or a few of them.
ENV_FIELDS: dict[str, tuple[st.SearchStrategy[str], st.SearchStrategy[str]]] = {
    "CNI_COMMAND": (st.sampled_from(GOOD_COMMANDS), junk("add", "", "ADD ")),
    "CNI_CONTAINERID": (
        good_container_ids,
        st.one_of(
            junk("", "-c1", "c1\n", "../c1", "c/1"),
            st.integers(cni.MAX_CONTAINER_ID + 1, 300).map(lambda n: "a" * n),
            spoiled(good_container_ids),
        ),
    ),
    "CNI_NETNS": (
        st.just(NETNS),
        junk("", "/proc/self/ns/mnt", "/nonexistent/netns", "/proc/self/ns", NETNS + "\x00"),
    ),
    "CNI_IFNAME": (
        good_ifnames,
        st.one_of(
            junk("", ".", "..", "a" * 16, "eth 0", "eth:0", "e/0", "ethé0000000000"),
            spoiled(good_ifnames),
        ),
    ),
    "CNI_ARGS": (k8s_args(valid=True), st.one_of(k8s_args(), junk("a;;=b", "=x", "K8S_POD_NAME"))),
    "CNI_PATH": (st.just("/fake"), junk("", "/fake:/nonexistent", "/fake\x00")),
}
commands = _mostly(*ENV_FIELDS["CNI_COMMAND"])


@st.composite
def cni_env(draw: st.DrawFn, **good: st.SearchStrategy[str]) -> dict[str, str]:
    """The CNI_* variables: good ones (`good` overrides a field's, e.g. the pod's netns), with
    none, one or a few of them spoiled, or one left out."""
    env = {key: draw(good.get(key, ok)) for key, (ok, _) in ENV_FIELDS.items()}
    spoil = draw(st.sampled_from([0, 0, 0, 0, 0, 1, 1, 1, 2, 3]))
    for key in draw(st.lists(st.sampled_from(sorted(env)), min_size=spoil, max_size=spoil)):
        env[key] = draw(ENV_FIELDS[key][1])
    drop = draw(st.lists(st.sampled_from(sorted(env)), max_size=1)) if rare(draw, 2) else []
    return {k: v for k, v in env.items() if k not in drop or k == "CNI_COMMAND"}


# --- pod annotations ----------------------------------------------------------------------------

network_names = junk_or(
    st.sampled_from(["net-a", "net-b", "net-x", "net-fail", "chained", "missing"]),
    "Net-A",
    "a" * 64,
    "",
)
namespaces = junk_or(st.sampled_from(["default", "other"]), "Default", "")
ip_like = junk_or(
    st.sampled_from(["10.1.0.50", "10.1.0.51/24", "fd00::5/64", "10.66.0.1", "::1"]),
    "10.1.0.256",
    "1.2.3.4/33",
)


@st.composite
def short_item(draw: st.DrawFn) -> str:
    item = draw(network_names)
    if draw(st.booleans()):
        item = f"{draw(namespaces)}/{item}"
    if draw(st.booleans()):
        item = f"{item}@{draw(ifnames)}"
    return item


short_form = st.lists(short_item(), min_size=1, max_size=4).map(", ".join)

port_mappings = st.lists(
    st.fixed_dictionaries(
        {"hostPort": st.integers(-5, 70000), "containerPort": st.integers(-5, 70000)},
        optional={"protocol": junk_or(st.sampled_from(["tcp", "UDP", "sctp"])), "hostIP": ip_like},
    )
    | json_values,
    max_size=2,
)
selection = st.fixed_dictionaries(
    {"name": network_names},
    optional={
        "namespace": namespaces,
        "interface": ifnames,
        "interfaceRequest": ifnames,
        "ips": st.lists(ip_like, max_size=2) | json_values,
        "mac": junk_or(st.just("0a:58:0a:00:00:05"), "0a:58:0a:00:00", "zz:58:0a:00:00:05"),
        "default-route": st.lists(ip_like, max_size=2),
        "cni-args": st.dictionaries(st.text(max_size=8), json_values, max_size=3) | json_values,
        "portMappings": port_mappings,
        "bandwidth": st.dictionaries(
            st.sampled_from(["ingressRate", "ingressBurst", "egressRate", "egressBurst", "x"]),
            st.integers(-5, 10**12) | json_values,
            max_size=3,
        ),
        "infiniband-guid": junk_or(st.just("00:11:22:33:44:55:66:77")),
        "deviceID": junk_or(st.just("0000:03:00.1")),
        "ipam-claim-reference": junk_or(st.just("claim")),
        "vendor.example/key": json_values,
        "unknownkey": json_values,
    },
)
json_form = st.one_of(
    st.lists(selection, max_size=3).map(json.dumps),
    st.lists(selection | json_values, max_size=3).map(json.dumps),
    json_values.map(json.dumps),
    deep_json(),
    st.lists(selection, min_size=1, max_size=2).map(lambda s: json.dumps(s)[:-1]),  # cut short
)
networks_annotation = st.one_of(short_form, short_form, json_form, json_form, any_text)
default_network_annotation = st.one_of(
    st.just("cluster"), network_names, short_form, json_form, any_text
)


@st.composite
def pod_annotations(draw: st.DrawFn) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not rare(draw, 1):
        out[NETWORKS] = draw(networks_annotation)
    if rare(draw, 2):
        out[DEFAULT_NETWORK] = draw(default_network_annotation)
    if rare(draw, 1):
        out[draw(st.text(max_size=10))] = draw(json_values)  # annotations are strings; not always
    return out


# --- network configs ----------------------------------------------------------------------------

# 1.1.0 most: STATUS and GC need it, CHECK needs 0.4.0.
versions = junk_or(
    st.sampled_from(["1.1.0", "1.1.0", "1.1.0", "1.0.0", "0.4.0", "0.3.1", "0.3.0"]),
    "0.2.0",
    "2.0.0",
    in_ten=1,
)


@st.composite
def results(draw: st.DrawFn) -> Any:
    """A prevResult: a CNI result of some version, or something shaped a little like one."""
    version = draw(st.sampled_from(cni.KNOWN_VERSIONS))
    result: dict[str, Any] = {"cniVersion": version}
    if version in ("0.1.0", "0.2.0"):
        result["ip4"] = {"ip": draw(ip_like), "gateway": draw(ip_like)}
    else:
        result["interfaces"] = [{"name": draw(ifnames), "sandbox": draw(junk_or(st.just(NETNS)))}]
        result["ips"] = [{"address": draw(ip_like), "interface": draw(st.integers(-1, 3))}]
        result["routes"] = [{"dst": draw(ip_like)}]
    if draw(st.booleans()):
        result[draw(st.sampled_from(["interfaces", "ips", "routes", "dns"]))] = draw(json_values)
    return result


@st.composite
def runtime_configs(draw: st.DrawFn) -> Any:
    rc: dict[str, Any] = {}
    if not rare(draw, 2):
        rc[POD_ANNOTATIONS] = draw(pod_annotations() | pod_annotations() | json_values)
    if rare(draw, 2):
        rc["portMappings"] = draw(port_mappings)
    if rare(draw, 2):
        rc[draw(st.sampled_from(["ips", "mac", "bandwidth", "deviceID", "x"]))] = draw(json_values)
    return draw(json_values) if rare(draw, 1) else rc


@st.composite
def configs(draw: st.DrawFn, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plexus network config a runtime passes on stdin (`base`: the installed one's keys,
    socketPath and the like)."""
    config: dict[str, Any] = {
        **(base or {}),
        "cniVersion": draw(versions),
        "name": draw(junk_or(st.just("plexus"))),
        "type": "plexus",
    }
    if not rare(draw, 2):
        config["runtimeConfig"] = draw(runtime_configs())
    if rare(draw, 3):
        config["prevResult"] = draw(results() | json_values)
    if rare(draw, 2):
        config[cni.VALID_ATTACHMENTS_KEY] = draw(
            st.lists(
                st.fixed_dictionaries({"containerID": container_ids, "ifname": ifnames})
                | json_values,
                max_size=3,
            )
        )
    if rare(draw, 2):
        config.update(draw(st.dictionaries(st.text(max_size=10), json_values, max_size=3)))
    drop = draw(st.lists(st.sampled_from(["cniVersion", "name", "type"]), max_size=1))
    if rare(draw, 1):
        for key in drop:
            config.pop(key, None)
    return config


@st.composite
def stdin_texts(
    draw: st.DrawFn, config: st.SearchStrategy[Any] | None = None, max_depth: int = 5000
) -> str:
    """What arrives on stdin: the config as JSON, or that JSON spoiled (`max_depth` bounds the
    deep nesting put in it)."""
    text = json.dumps(draw(config if config is not None else configs()))
    if not rare(draw, 2):
        return text
    how = draw(st.integers(0, 4))
    if how == 0:
        return text[: draw(st.integers(1, max(1, len(text) - 1)))]  # cut short
    if how == 1:
        return text[:-1] + ', "x": ' + draw(deep_json(60, max_depth)) + "}"
    if how == 2:
        return text.replace("1.0.0", "NaN", 1).replace('"NaN"', "NaN", 1)
    if how == 3:
        return draw(any_text | environ_text)
    return draw(json_values.map(json.dumps))


# --- NAD manifests ------------------------------------------------------------------------------


@st.composite
def nad_configs(draw: st.DrawFn) -> Any:
    """spec.config: a CNI config or conflist as JSON text, or junk."""
    plugin = {"type": draw(junk_or(st.sampled_from(["macvlan", "tuning", "broken"])))}
    if draw(st.booleans()):
        plugin.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    conf: dict[str, Any] = {"cniVersion": draw(versions)}
    if draw(st.booleans()):
        conf["plugins"] = [plugin, *draw(st.lists(json_values, max_size=1))]
    else:
        conf.update(plugin)
    if draw(st.booleans()):
        conf["name"] = draw(network_names)
    return draw(
        st.one_of(
            st.just(json.dumps(conf)),
            st.just(json.dumps(conf)),
            stdin_texts(st.just(conf)),
            json_values,
        )
    )


@st.composite
def nad_documents(draw: st.DrawFn) -> Any:
    meta: dict[str, Any] = {"name": draw(network_names)}
    if draw(st.booleans()):
        meta["namespace"] = draw(namespaces)
    if draw(st.booleans()):
        meta["annotations"] = draw(
            st.dictionaries(
                st.sampled_from(["k8s.v1.cni.cncf.io/resourceName", "x"]), json_values, max_size=2
            )
        )
    doc: dict[str, Any] = {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": draw(junk_or(st.just("NetworkAttachmentDefinition"))),
        "metadata": draw(json_values) if rare(draw, 1) else meta,
    }
    if not rare(draw, 1):
        doc["spec"] = draw(json_values) if rare(draw, 1) else {"config": draw(nad_configs())}
    return draw(json_values) if rare(draw, 1) else doc


@st.composite
def nad_manifests(draw: st.DrawFn) -> str:
    docs = draw(st.lists(nad_documents(), max_size=3))
    text = yaml.safe_dump_all(docs)
    if not rare(draw, 3):
        return text
    how = draw(st.integers(0, 4))
    if how == 0:
        return text[: draw(st.integers(1, max(1, len(text) - 1)))]
    if how == 1:
        return draw(deep_json(60, 3000))  # JSON is YAML
    if how == 2:
        return "- " * draw(st.integers(50, 2000)) + "x\n"  # block sequences nested deep
    if how == 3:
        return draw(any_text)
    tail = draw(st.sampled_from(["&a [*a]", "!!python/object:os.system x", "a: *b", "{a: 1"]))
    return text + "---\n" + tail


# --- the shim's envelope, as raw bytes --------------------------------------------------------


@st.composite
def envelopes(
    draw: st.DrawFn,
    env: st.SearchStrategy[dict[str, str]] | None = None,
    config: st.SearchStrategy[Any] | None = None,
) -> bytes:
    """The body of POST /cni: {"env": {...}, "config": "<stdin>"}, or bytes that are not."""
    body: Any = {
        "env": draw(env if env is not None else cni_env()),
        "config": draw(stdin_texts(config)),
    }
    if not rare(draw, 3):
        return json.dumps(body).encode()
    how = draw(st.integers(0, 6))
    if how == 0:
        body["env"] = draw(json_values)
    elif how == 1:
        body["config"] = draw(json_values)
    elif how == 2:
        body = draw(json_values)
    elif how == 3:
        return draw(st.binary(max_size=200))
    elif how == 4:
        return b'{"env": {}, "config": "", "x": ' + draw(deep_json()).encode() + b"}"
    raw = json.dumps(body).encode()
    if how == 5:
        return raw[: draw(st.integers(1, max(1, len(raw) - 1)))]
    at = draw(st.integers(0, len(raw)))
    return raw[:at] + draw(st.binary(min_size=1, max_size=4)) + raw[at:]


def stays_in_the_bed(stdin: bytes, base: dict[str, Any]) -> bool:
    """False when the shim would read a socketPath or spoolDir other than the test's from this
    stdin: it would fall back to /run/plexus and /var/lib/plexus, the machine's own."""
    try:
        # as the shim reads it: an empty stdin is an empty config (default paths)
        config = json.loads(stdin.decode("utf-8", "replace") or "{}")
    except (ValueError, RecursionError):
        return True  # the shim answers code 6 itself
    if not isinstance(config, dict):
        return True
    return all(config.get(key) == base.get(key) for key in ("socketPath", "spoolDir"))
