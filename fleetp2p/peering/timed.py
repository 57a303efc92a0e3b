"""Tracker calls with latency and error metrics, so the fetch path reads as plain calls."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fleetp2p.metrics import Metrics
from tracker.errors import TrackerUnavailable

T = TypeVar("T")


async def timed(metrics: Metrics, op: str, call: Callable[[], Awaitable[T]]) -> T:
    started = time.monotonic()
    try:
        return await call()
    except TrackerUnavailable:
        metrics.tracker_errors.labels(op).inc()
        raise
    finally:
        metrics.tracker_latency.labels(op).observe(time.monotonic() - started)
