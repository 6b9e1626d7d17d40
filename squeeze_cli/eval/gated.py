"""Runs whose images `gen`'s identity gate chose (`quality:` in the manifest): each such image is the one
with the highest DINO of several seeds, which inflates DINO and CLIP-I against DreamBench's one image per
seed and favours copies of the reference. Such a run is marked in every table, report and `metrics.json`,
and is not scored under the `dreambench` protocol unless asked (`--allow-gated`). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from squeeze_cli.errors import SqueezeError
from squeeze_cli.eval.rundir import RunContents
from squeeze_cli.metrics.protocol import Protocol

EFFECT = "DINO and CLIP-I are inflated, not DreamBench's protocol (one image per seed)"


class GatedRunError(SqueezeError):
    """A gated run evaluated as DreamBench numbers without `--allow-gated` (exit code 2)."""


def gate_summary(contents: RunContents) -> dict[str, Any] | None:
    """`metrics.json`'s `gate`: how many images the gate chose and with which settings; None: ungated."""
    gated = [image.gate for image in contents.images if image.gate is not None]
    if not gated:
        return None
    return {
        "images": len(gated),
        "of": len(contents.images),
        "regenerated": sum(gate.attempts is not None and gate.attempts > 1 for gate in gated),
        "min_dino": sorted({gate.min_dino for gate in gated if gate.min_dino is not None}),
        "max_attempts": sorted({gate.max_attempts for gate in gated if gate.max_attempts is not None}),
        "warning": EFFECT,
    }


def gate_line(gate: dict[str, Any]) -> str:
    """One line for tables and the report: `gated: 6 of 6 images are the best DINO of up to 3 seeds ...`."""
    # Sidecars older than `max_attempts` in the record do not say how many seeds were allowed.
    seeds = f"up to {'/'.join(map(str, gate['max_attempts']))}" if gate["max_attempts"] else "several"
    return (
        f"gated: {gate['images']} of {gate['of']} images are the best DINO of {seeds} seeds (gen's identity "
        f"gate, {gate['regenerated']} remade): {EFFECT}"
    )


def refuse_gated_runs(runs: Sequence[RunContents], protocol: Protocol, allow_gated: bool) -> None:
    """Stop before any work when a gated run would be scored as DreamBench numbers.

    Raises:
        `GatedRunError`: the first such run, unless `allow_gated` or the metric set is not `dreambench`.
    """
    if allow_gated or protocol.metric_set != "dreambench":
        return
    for contents in runs:
        if gated := contents.gated:
            raise GatedRunError(
                f"{contents.path}: {len(gated)} of {len(contents.images)} images were chosen by gen's "
                "identity gate (`quality:` keeps the best DINO of several seeds), which inflates DINO and "
                "CLIP-I: its scores are not DreamBench protocol numbers",
                "evaluate a run made without `quality:`, or add --allow-gated to score it marked as gated",
            )
