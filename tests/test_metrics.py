"""An agent's labelled series exist from its start: a rate needs two samples,
and a series born with its first burst already counted never shows one."""

from __future__ import annotations

from prometheus_client import generate_latest

from fleetp2p.metrics import HEDGE_WINNERS, SOURCES, Metrics


def test_labelled_series_exist_before_anything_happens() -> None:
    text = generate_latest(Metrics().registry).decode()
    for source in SOURCES:
        for name in ("fleetp2p_served_bytes_total", "fleetp2p_fetched_bytes_total",
                     "fleetp2p_segments_fetched_total", "fleetp2p_lazy_fetched_bytes_total",
                     "fleetp2p_time_to_first_byte_seconds_count"):
            assert f'{name}{{source="{source}"}} 0.0' in text, (name, source)
    for winner in HEDGE_WINNERS:
        assert f'fleetp2p_read_hedges_total{{winner="{winner}"}} 0.0' in text, winner
