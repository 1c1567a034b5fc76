"""Label selectors as the Kubernetes API defines them: `matchLabels` and `matchExpressions`
(In, NotIn, Exists, DoesNotExist) ANDed together; an empty selector selects everything.

Two ways to ask: `matches(selector, labels)` for one object, and `LabelIndex.select(selector)`
for a whole population at once (the compiler asks the same selectors of thousands of pods: an
inverted index answers with set operations instead of a label comparison per pod).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping

from netpolicy.model import LabelSelector, LabelSelectorRequirement

SelectorKey = tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str, tuple[str, ...]], ...]]


def selector_key(selector: LabelSelector) -> SelectorKey:
    """A hashable, canonical form: two selectors that say the same thing get the same key."""
    labels = tuple(sorted(selector.match_labels.items()))
    exprs = tuple(
        sorted(
            {
                (r.key, r.operator, tuple(sorted(set(r.values))) if _uses_values(r) else ())
                for r in selector.match_expressions
            }
        )
    )
    return labels, exprs


def _uses_values(req: LabelSelectorRequirement) -> bool:
    return req.operator in ("In", "NotIn")


def requirement_matches(req: LabelSelectorRequirement, labels: Mapping[str, str]) -> bool:
    present = req.key in labels
    if req.operator == "Exists":
        return present
    if req.operator == "DoesNotExist":
        return not present
    if req.operator == "In":
        return present and labels[req.key] in req.values
    # NotIn: an object without the key matches (the API's rule)
    return not present or labels[req.key] not in req.values


def matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    if any(labels.get(k) != v for k, v in selector.match_labels.items()):
        return False
    return all(requirement_matches(r, labels) for r in selector.match_expressions)


class LabelIndex:
    """An inverted index over a fixed population (item i has labels[i]); `select` returns the
    set of item numbers a selector selects. Answers are cached per canonical selector."""

    def __init__(self, labels: Iterable[Mapping[str, str]]) -> None:
        self._by_pair: dict[tuple[str, str], set[int]] = defaultdict(set)
        self._by_key: dict[str, set[int]] = defaultdict(set)
        n = 0
        for i, item_labels in enumerate(labels):
            n = i + 1
            for k, v in item_labels.items():
                self._by_pair[(k, v)].add(i)
                self._by_key[k].add(i)
        self.all: frozenset[int] = frozenset(range(n))
        self._cache: dict[SelectorKey, frozenset[int]] = {}

    def select(self, selector: LabelSelector) -> frozenset[int]:
        key = selector_key(selector)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._evaluate(key)
        return hit

    def _evaluate(self, key: SelectorKey) -> frozenset[int]:
        labels, exprs = key
        result: set[int] | frozenset[int] = self.all
        empty: set[int] = set()
        for pair in labels:
            result = result & self._by_pair.get(pair, empty)
        for k, op, values in exprs:
            if op == "Exists":
                result = result & self._by_key.get(k, empty)
            elif op == "DoesNotExist":
                result = result - self._by_key.get(k, empty)
            else:
                having: set[int] = set()
                for v in values:
                    having |= self._by_pair.get((k, v), empty)
                result = result & having if op == "In" else result - having
            if not result:
                break
        return frozenset(result)
