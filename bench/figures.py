"""The figure shape every benchmark returns (bench/README.md), built in one place."""

from __future__ import annotations

from typing import Any

__all__ = ["throughput"]


def throughput(
    label: str, value: float, baseline_label: str, baseline: float, unit: str = "points/s"
) -> dict[str, Any]:
    """A throughput figure beside its baseline from the same run, with their ratio."""
    return {
        "label": label,
        "value": round(value),
        "unit": unit,
        "baseline_label": baseline_label,
        "baseline_value": round(baseline),
        "ratio": round(value / baseline, 3),
        "kind": "throughput",
    }
