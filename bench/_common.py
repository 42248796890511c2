"""Shared by the benchmark scripts: environment record, timing, and JSON output (atomic write, logart.report's)."""

from __future__ import annotations

import platform
import statistics
import time

from logart.report import now, versions, write_json  # noqa: F401  (write_json: re-exported for the scripts)


def environment() -> dict:
    """When, with what, on what: logart.report's versions plus the date and the CPU."""
    return {"date": now(), **versions(), "cpu": platform.processor() or platform.machine()}


def median_time(fn, repeats: int = 5, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` runs, after `warmup` unmeasured runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times
