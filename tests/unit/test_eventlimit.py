"""The Event limiter (cnispec.eventlimit): repeats bump one Event, a per-object token bucket
and a global one cap the writes, drops are counted and reported once per window. The clock is
injected: no test waits."""

from __future__ import annotations

from cnispec.eventlimit import Bump, Create, Drop, EventLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limiter(clock: Clock, **kw: float) -> EventLimiter:
    return EventLimiter(clock=clock, **kw)  # type: ignore[arg-type]


def test_repeats_bump_the_event_already_written() -> None:
    clock = Clock()
    lim = limiter(clock)
    assert lim.decide("pod-uid", "Warning", "AddFailed", "boom") == Create()
    assert lim.count("pod-uid", "Warning", "AddFailed", "boom") == 1
    lim.created("pod-uid", "Warning", "AddFailed", "boom", "web.abc")
    clock.now += 5
    assert lim.decide("pod-uid", "Warning", "AddFailed", "boom") == Bump("web.abc", 2)
    assert lim.decide("pod-uid", "Warning", "AddFailed", "boom") == Bump("web.abc", 3)
    # Another message is another Event.
    assert lim.decide("pod-uid", "Warning", "AddFailed", "other") == Create()


def test_a_repeat_after_the_window_is_a_new_event() -> None:
    clock = Clock()
    lim = limiter(clock, window=600.0)
    lim.decide("p", "Warning", "AddFailed", "boom")
    lim.created("p", "Warning", "AddFailed", "boom", "e1")
    clock.now += 601
    assert lim.decide("p", "Warning", "AddFailed", "boom") == Create()
    assert lim.count("p", "Warning", "AddFailed", "boom") == 1


def test_a_crash_looping_pod_gets_its_burst_then_one_write_per_refill() -> None:
    clock = Clock()
    lim = limiter(clock, burst=10, refill=300.0)
    decisions = []
    for _ in range(50):
        decision = lim.decide("p", "Warning", "AddFailed", "boom")
        if isinstance(decision, Create):
            lim.created("p", "Warning", "AddFailed", "boom", "e1")
        decisions.append(decision)
    assert decisions[0] == Create()
    assert decisions[1:10] == [Bump("e1", n) for n in range(2, 11)]
    assert decisions[10] == Drop(report=True, dropped=1)
    assert decisions[49] == Drop(report=False, dropped=40)
    assert lim.dropped == 40
    # One token later the next write carries every failure, the dropped ones included.
    clock.now += 300
    assert lim.decide("p", "Warning", "AddFailed", "boom") == Bump("e1", 51)
    # Other pods have their own budget.
    assert lim.decide("q", "Warning", "AddFailed", "boom") == Create()


def test_drops_are_reported_once_per_window() -> None:
    clock = Clock()
    lim = limiter(clock, burst=1, refill=10_000.0, window=600.0)
    lim.decide("p", "Warning", "X", "m")
    assert lim.decide("p", "Warning", "X", "m") == Drop(report=True, dropped=1)
    assert lim.decide("p", "Warning", "X", "m") == Drop(report=False, dropped=2)
    clock.now += 601
    assert lim.decide("p", "Warning", "X", "m") == Drop(report=True, dropped=1)


def test_the_global_cap_holds_across_pods() -> None:
    clock = Clock()
    lim = limiter(clock, burst=10, global_burst=3, global_refill=1.0)
    assert [type(lim.decide(f"pod-{i}", "Warning", "X", "m")) for i in range(5)] == [
        Create,
        Create,
        Create,
        Drop,
        Drop,
    ]
    clock.now += 1
    assert lim.decide("pod-9", "Warning", "X", "m") == Create()


def test_an_expired_event_is_created_again_with_its_count() -> None:
    clock = Clock()
    lim = limiter(clock)
    lim.decide("p", "Warning", "X", "m")
    lim.created("p", "Warning", "X", "m", "e1")
    assert lim.decide("p", "Warning", "X", "m") == Bump("e1", 2)
    lim.forget("p", "Warning", "X", "m")  # the PATCH answered 404
    assert lim.decide("p", "Warning", "X", "m") == Create()
    assert lim.count("p", "Warning", "X", "m") == 3


def test_tables_are_bounded() -> None:
    clock = Clock()
    lim = limiter(clock, max_keys=8)
    for i in range(100):
        lim.decide(f"pod-{i}", "Warning", "X", f"m{i}")
    assert len(lim._seen) <= 8 and len(lim._buckets) <= 8
