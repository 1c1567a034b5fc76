"""Loading the VF pools file's YAML into a pydantic model so that every error names file:line.

Used by `sriov.pools` (`parse_pools` calls `load_validated`), by `cnispec.vfpools`, whose
validators raise `invalid()` errors (their text is shown as written and their `at` points the
line at the field at fault), and by every other YAML file an admin writes and wants `file:line`
for. YAML is read with 1.2 core scalars, and a duplicate key is an error, not a silent
overwrite. Pure: no file I/O (the caller reads the file).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any, Final, TypeVar

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from cnispec.errors import InvalidConfig

M = TypeVar("M", bound=BaseModel)

_OURS: Final = "vf_pools"  # the error type of invalid(): its text is shown as it is
_INT, _FLOAT, _BOOL = (f"tag:yaml.org,2002:{t}" for t in ("int", "float", "bool"))


def invalid(reason: str, *, at: tuple[str | int, ...] = ()) -> PydanticCustomError:
    """A validation error whose text is ours. `at` extends the error's location (a model
    validator sees the whole model, but the admin wants the line of the field at fault)."""
    return PydanticCustomError(_OURS, "{reason}", {"reason": reason, "at": at})


def load_validated(text: str, source: str, model: type[M], *, expect: str, fields: str) -> M:
    """`text` (read from `source`) as a `model`. Every problem raises InvalidConfig as
    "source:line: location: message"; `expect` says what an empty file lacks and `fields`
    how field names are spelt (both for the messages)."""
    root, data = _compose(text, source)
    if root is None:
        raise InvalidConfig(f"{source}:1: the file is empty: {expect}")
    _reject_duplicate_keys(root, source)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidConfig(_describe(exc, root, source, fields)) from None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars. YAML 1.1 would read an unquoted 0x8086 as 32902,
    0000:3b:00.0 as a base-60 float and `no` as false: none of that is what an admin means."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT, _BOOL)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(_INT, re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)$"), list("-+.0123456789")
)
_Loader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _compose(text: str, source: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (it has the line marks) and the data built from it."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise InvalidConfig(f"{source}:{line}: not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidConfig(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def _reject_duplicate_keys(node: yaml.Node, source: str) -> None:
    # PyYAML lets the last of two equal keys win without a word: a typo'd copy of a pool's
    # selectors would silently replace the first.
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise InvalidConfig(
                        f"{source}:{key.start_mark.line + 1}: duplicate key {key.value!r}"
                    )
                seen.add(key.value)
    for child in _children(node):
        _reject_duplicate_keys(child, source)


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value
    elif isinstance(node, yaml.SequenceNode):
        yield from node.value


def _describe(exc: ValidationError, root: yaml.Node, source: str, fields: str) -> str:
    found: list[tuple[int, str]] = []
    for err in exc.errors(include_url=False):
        ctx = err.get("ctx") or {}
        loc = (*err["loc"], *ctx.get("at", ()))
        line = line_of(root, loc)
        found.append((line, f"{source}:{line}: {_loc_text(loc)}: {_message(err, fields)}"))
    found.sort(key=lambda item: item[0])
    return "; ".join(text for _, text in found)


def line_of(root: yaml.Node, loc: Iterable[str | int]) -> int:
    """The line (1-based) of the deepest node of `loc` that the file has; a missing field
    points at the mapping that lacks it."""
    node, line = root, root.start_mark.line
    for part in loc:
        step = _step(node, part)
        if step is None:
            break
        line, node = step
    return line + 1


def _step(node: yaml.Node, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == part:
                return key.start_mark.line, value
    elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
        item = node.value[part]
        return item.start_mark.line, item
    return None


def _loc_text(loc: Iterable[str | int]) -> str:
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    return text or "(top level)"


def _message(err: Any, fields: str) -> str:
    kind, given = err["type"], err.get("input")
    if kind == _OURS:
        return str(err["msg"])
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return f"unknown field ({fields})"
    if kind == "model_type" and not isinstance(given, dict):
        return f"expected a mapping, got {type(given).__name__}"
    if isinstance(given, str | int | float | bool) or given is None:
        return f"{err['msg']} (got {given!r})"
    return str(err["msg"])
