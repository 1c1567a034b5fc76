"""Label selectors as the API defines them: matchLabels and matchExpressions ANDed, an empty
selector selecting everything, NotIn and DoesNotExist matching objects without the key; the
inverted index answers exactly what the one-object check answers."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netpolicy.model import LabelSelector
from netpolicy.selectors import LabelIndex, matches, selector_key


def sel(**raw: Any) -> LabelSelector:
    return LabelSelector.model_validate(raw)


def expr(key: str, op: str, *values: str) -> dict[str, Any]:
    return {"key": key, "operator": op, "values": list(values)}


WEB = {"app": "web", "tier": "front"}


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        (sel(), {}, True),
        (sel(), WEB, True),
        (sel(matchLabels={"app": "web"}), WEB, True),
        (sel(matchLabels={"app": "web", "tier": "back"}), WEB, False),
        (sel(matchLabels={"app": "web"}), {}, False),
        (sel(matchExpressions=[expr("app", "In", "db", "web")]), WEB, True),
        (sel(matchExpressions=[expr("app", "In", "db")]), WEB, False),
        (sel(matchExpressions=[expr("app", "In", "web")]), {}, False),
        (sel(matchExpressions=[expr("app", "NotIn", "web")]), WEB, False),
        (sel(matchExpressions=[expr("app", "NotIn", "db")]), WEB, True),
        (sel(matchExpressions=[expr("app", "NotIn", "web")]), {}, True),  # no key: matches
        (sel(matchExpressions=[expr("tier", "Exists")]), WEB, True),
        (sel(matchExpressions=[expr("tier", "Exists")]), {"app": "web"}, False),
        (sel(matchExpressions=[expr("tier", "DoesNotExist")]), WEB, False),
        (sel(matchExpressions=[expr("tier", "DoesNotExist")]), {}, True),
        # everything is ANDed
        (
            sel(matchLabels={"app": "web"}, matchExpressions=[expr("tier", "In", "back")]),
            WEB,
            False,
        ),
        (
            sel(
                matchExpressions=[expr("app", "Exists"), expr("tier", "NotIn", "back")],
            ),
            WEB,
            True,
        ),
    ],
)
def test_one_object(selector: LabelSelector, labels: dict[str, str], expected: bool) -> None:
    assert matches(selector, labels) is expected
    assert (LabelIndex([labels]).select(selector) == {0}) is expected


def test_selector_key_ignores_order_and_duplicates() -> None:
    a = sel(matchLabels={"a": "1", "b": "2"}, matchExpressions=[expr("x", "In", "p", "q")])
    b = sel(
        matchLabels={"b": "2", "a": "1"},
        matchExpressions=[expr("x", "In", "q", "p", "p"), expr("x", "In", "p", "q")],
    )
    assert selector_key(a) == selector_key(b)
    assert selector_key(a) != selector_key(sel(matchLabels={"a": "1"}))


KEYS = st.sampled_from(["app", "tier", "env", "team"])
VALUES = st.sampled_from(["a", "b", "c"])
LABELS = st.dictionaries(KEYS, VALUES, max_size=4)
EXPRS = st.builds(
    lambda k, op, vs: expr(k, op, *vs) if op in ("In", "NotIn") else expr(k, op),
    KEYS,
    st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]),
    st.lists(VALUES, min_size=1, max_size=3),
)
SELECTORS = st.builds(
    lambda ml, me: sel(matchLabels=ml, matchExpressions=me),
    st.dictionaries(KEYS, VALUES, max_size=2),
    st.lists(EXPRS, max_size=3),
)


@settings(max_examples=200, deadline=None)
@given(population=st.lists(LABELS, max_size=12), selector=SELECTORS)
def test_index_agrees_with_the_one_object_check(
    population: list[dict[str, str]], selector: LabelSelector
) -> None:
    index = LabelIndex(population)
    expected = {i for i, labels in enumerate(population) if matches(selector, labels)}
    assert index.select(selector) == expected
    assert index.select(selector) == expected  # and again, from its cache
