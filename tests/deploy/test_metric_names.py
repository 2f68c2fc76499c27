"""Every metric deploy/ reads is a documented name (docs/metrics.md)."""

from __future__ import annotations

from .helpers import documented_metric_names, facestage_names_in, metric_names_used


def test_extraction_takes_identifiers_whole_and_strips_histogram_suffixes() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le) ("
        'rate(facestage_batch_size_bucket{stage="facestage_x"}[5m])))'
        " / stage:facestage_serving:replicas + facestage_requests_total"
    )
    assert facestage_names_in(expr) == {"facestage_batch_size", "facestage_requests_total"}


def test_metric_names_used_are_documented() -> None:
    used = metric_names_used()
    documented = documented_metric_names()
    assert len(documented) >= 20, "docs/metrics.md tables not found"
    assert used, "no facestage_* metric found in deploy/"
    # Scaling signal and the replica count must be among them.
    assert {
        "facestage_requests_in_flight",
        "facestage_batcher_queue_depth",
        "facestage_serving",
    } <= used
    undocumented = used - documented
    assert not undocumented, f"used in deploy/ but not in docs/metrics.md: {sorted(undocumented)}"


def test_no_recording_rule_output_is_reported_as_a_process_metric() -> None:
    assert all(":" not in name for name in metric_names_used())
