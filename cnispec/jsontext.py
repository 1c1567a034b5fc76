"""JSON from outside the daemon, decoded with a bound on nesting and refused when it is not text.

`json.loads` recurses once per nested array or object: input nested about a thousand deep raises
RecursionError (a crash answered as 999, not a decode error), and input nested a little less
decodes but can blow the stack later, in whatever walks it (pydantic, `json.dumps` of a record).
Network configs, prevResults, pod annotations and the shim's envelope nest a handful of levels,
so anything deeper than `MAX_DEPTH` is refused as malformed whatever the interpreter's limit.

Python also reads what other JSON readers refuse, and what fails far from the decoder:
`"\\ud800"` decodes to a lone surrogate, a str that cannot be encoded (a record write fails on
it, after the record directory exists), and `NaN`/`Infinity` are not JSON (RFC 8259). Both are
refused here too.

Every refusal is a `JsonRefused`, a ValueError, so a caller's `except ValueError` (which
already covers syntax errors and undecodable bytes) covers it: the call sites map it to their
own CNI code (6 for stdin, 7 for an annotation or a NAD).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NoReturn

MAX_DEPTH: Final = 64
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


class JsonRefused(ValueError):
    """JSON that Plexus does not read: nested too deep, a lone surrogate, NaN or Infinity."""


def loads(text: str | bytes, *, surrogates: bool = False) -> Any:
    """`json.loads` for untrusted text; raises ValueError (JsonRefused for the cases above).

    `surrogates=True` lets lone surrogates through, for a caller that judges them itself (the
    shim's envelope carries CNI_* values as os.environ decoded them, surrogate escapes and all;
    parse_request answers those with code 4)."""
    try:
        value = json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        # Nested so deep the C scanner ran out of stack: necessarily deeper than the bound.
        raise JsonRefused(_too_deep()) from None
    _check(value, surrogates=surrogates)
    return value


def _refuse_constant(name: str) -> NoReturn:
    raise JsonRefused(f"{name} is not a JSON number")


def _too_deep() -> str:
    return f"nested deeper than {MAX_DEPTH} arrays/objects"


def _check(value: Any, *, surrogates: bool) -> None:
    """Walk the decoded value without recursing: depth bound, and text that can be encoded."""
    check_text = _ignore if surrogates else _check_text
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            check_text(item)
        elif isinstance(item, dict | list):
            if depth >= MAX_DEPTH:
                raise JsonRefused(_too_deep())
            if isinstance(item, dict):
                for key in item:
                    check_text(key)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)


def _check_text(text: str) -> None:
    found = _SURROGATE.search(text)
    if found:
        raise JsonRefused(
            f"a string holds \\u{ord(found.group()):04x}, an unpaired surrogate that is not a "
            "character (invalid UTF-16 escape)"
        )


def _ignore(text: str) -> None:
    return None
