"""The `small` random checkpoint (benchmarks): the real layout, loaded by `from_pretrained`, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from squeeze_cli.pipelines.squeeze import SqueezePipeline
from squeeze_cli.pipelines.tiny import build_small_pipeline


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl"])
def test_small_checkpoint_loads_and_generates(tmp_path: Path, family: str) -> None:
    pipe = SqueezePipeline.from_pretrained(build_small_pipeline(tmp_path / "small", family=family))
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 256
    assert pipe.mllm.config.get_text_config().hidden_size == 256
    references = [Image.new("RGB", (80, 64), (200, 60, 30)), Image.new("RGB", (64, 64), (20, 90, 160))]
    subject = pipe.encode_subject(references, reference_size=32)
    assert subject.image_tokens.shape[0] >= 2 * (16 if family == "internvl" else 4)
    out = pipe(
        ["a toy on a table"],
        subject_condition=subject,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=[torch.Generator().manual_seed(0)],
        output_type="np",
    )
    assert out.images.shape == (1, 32, 32, 3)
