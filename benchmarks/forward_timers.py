"""Where a run spends its time: wall time inside each kind of model forward, by patching the classes.

    with ForwardTimers() as timers:
        ...                      # anything: a naive loop, `squeeze gen` in this process
    timers.seconds               # {"mllm": s, "aggregator": s, "transformer": s, "vae_encode": s, ...}

The patched methods are the top-level entry points (never nested in one another), so the shares add up;
what is left of the wall time is Python, data movement and file writing outside model forwards.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from typing import Any


def _targets() -> dict[str, tuple[type, str]]:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from PIL import Image

    from squeeze_cli.pipelines.aggregator import DualLayerAggregator
    from squeeze_cli.pipelines.mllm import MLLMEncoder

    return {
        "mllm": (MLLMEncoder, "_forward"),
        "aggregator": (DualLayerAggregator, "forward"),
        "transformer": (FluxTransformer2DModel, "forward"),
        "vae_encode": (AutoencoderKL, "encode"),
        "vae_decode": (AutoencoderKL, "decode"),
        "png_write": (Image.Image, "save"),
    }


class ForwardTimers:
    """Accumulates wall time and call counts per kind of forward while the context is open."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._originals: list[tuple[type, str, Any]] = []

    def __enter__(self) -> ForwardTimers:
        for name, (cls, attribute) in _targets().items():
            original = cls.__dict__[attribute]
            self._originals.append((cls, attribute, original))
            setattr(cls, attribute, self._timed(name, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for cls, attribute, original in reversed(self._originals):
            setattr(cls, attribute, original)
        self._originals.clear()

    def _timed(self, name: str, function: Any) -> Any:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started
                self.calls[name] += 1

        return timed

    def model_seconds(self) -> float:
        """Time inside model forwards (everything but PNG writing)."""
        return sum(s for name, s in self.seconds.items() if name != "png_write")
