"""The memory guard judges memory in use, not the resident set a burst leaves behind.

CPython's small-object allocator keeps an arena resident while any object in it lives,
so after a burst is freed RSS stays near its peak. Judged on RSS alone, a collector
that had handed every span on went on refusing data (tests/reliability/
test_collector_overload.py saw it refuse in the first second after an overload, and
once take nothing again after its first refusal). These tests use the real allocator
and the process's real ``/proc/self/statm``: no mocks.
"""

from __future__ import annotations

import gc

import pytest

from otel_dl.collector import admission

MIB = 1 << 20
# Bytes objects of 56 payload bytes: pymalloc's 96-byte class, 170 to a 16 KiB pool.
_PAYLOAD = 48
_BURST = 600_000  # about 55 MiB of objects, like ~35k buffered spans
_KEEP_EVERY = 100  # one survivor in every pool keeps every arena resident


def _burst(tag: int) -> list[bytes]:
    return [bytes(_PAYLOAD) + (tag * _BURST + i).to_bytes(8, "big") for i in range(_BURST)]


@pytest.mark.skipif(
    admission._ALLOCATOR is None,
    reason="pymalloc statistics unreadable here (PYTHONMALLOC set, or no open_memstream)",
)
def test_freed_python_memory_is_free_for_the_guard_and_reused_before_rss_grows() -> None:
    gc.collect()
    before = admission.rss_bytes()
    data = _burst(1)
    peak = admission.rss_bytes()
    survivors = data[::_KEEP_EVERY]
    del data
    gc.collect()
    rss = admission.rss_bytes()
    free = admission.python_free_bytes()
    assert peak - before > 40 * MIB, "the burst did not take memory"
    # The premise: RSS stays high after the burst is freed, the memory is free inside
    # Python's allocator.
    assert rss - before > 0.8 * (peak - before), (before >> 20, peak >> 20, rss >> 20)
    assert free > 0.8 * (peak - before), (free >> 20, (peak - before) >> 20)

    # A soft limit between the memory in use and RSS: RSS alone would refuse.
    in_use = rss - free
    guard = admission.MemoryGuard(int((rss + in_use) / 2 / admission.SOFT_LIMIT_FRACTION))
    assert guard.soft_limit < rss
    assert guard.sample() is False
    assert guard.rss > guard.soft_limit > guard.in_use

    # And it is safe: a second burst of the same size reuses that memory first.
    again = _burst(2)
    grown = admission.rss_bytes() - rss
    assert grown < 0.2 * (peak - before), f"RSS grew {grown >> 20} MiB on reuse"
    assert guard.sample() is True  # now the memory is in use again: refuse
    assert guard.in_use > guard.soft_limit
    del again, survivors
