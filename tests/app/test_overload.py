"""Overload, short: open-loop arrivals at 3x and 30x the capacity the server shows under closed-loop load.

The long run (2 minutes per level, RSS over time) is ``python benchmarks/overload.py``; its figures are in
docs/reliability.md. This CI version runs 8 s per level on a shared 2-core machine, so it checks goodput
against 60% of capacity (the server before admission by time delivered 18%); everything else is checked
as strictly as the issue asks: no 5xx but 504, at most 1% 504s, 429s within 1 s, nothing lost.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from benchmarks.overload import closed_loop, open_loop, start_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_goodput_holds_and_the_excess_is_refused_early_and_honestly() -> None:
    proc, url = start_server()
    try:
        capacity = asyncio.run(closed_loop(url, clients=8, seconds=5))
        outcomes = [asyncio.run(open_loop(url, capacity * f, 8.0, f"{f:g}x")) for f in (3.0, 30.0)]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert capacity > 0
    for o in outcomes:
        answered = o.ok_in_deadline + o.ok_late + o.refused_429 + o.deadline_504
        assert o.other == {}, f"{o.label}: statuses other than 200/429/504, or no answer (0): {o.other}"
        assert answered == o.sent  # every request answered; every accepted one completed
        assert o.deadline_504 <= 0.01 * o.sent, f"{o.label}: {o.deadline_504} of {o.sent} ended in 504"
        assert o.goodput >= 0.6 * capacity, f"{o.label}: goodput {o.goodput:.2f}/s vs capacity {capacity:.2f}/s"
        # The excess is refused, and at once. At 3x an underestimated capacity (the 5 s measurement ran while
        # the machine was busier) may leave no excess: then every request was served within its deadline.
        assert o.refused_429 > 0 or (o.label == "3x" and o.ok_in_deadline == o.sent), o
        assert o.max_429_s < 1.0
        assert all(1 <= seconds <= 10 for seconds in o.retry_after)  # Retry-After present, in seconds
