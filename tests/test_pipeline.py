"""SqueezePipeline end to end on tiny random checkpoints (64×64 images, a few steps, CPU): what is the squeeze
pipeline's own. The contract every pipeline meets (batches, seeds, callbacks, both MLLM families, ...) is in
tests/test_pipeline_contract.py."""

import json

import numpy as np
import PIL.Image
import pytest
import torch

from squeeze_cli.pipelines.aggregator import DualLayerAggregator
from squeeze_cli.pipelines.squeeze import SqueezePipeline, SqueezePipelineOutput, SubjectCondition
from squeeze_cli.pipelines.stages import stage_plan
from squeeze_cli.pipelines.tiny import build_tiny_components, build_tiny_pipeline

SIZE = 64
STEPS = 4
# With 4 steps at 64×64 the shifted sigmas are 1.0, 0.83, 0.61, 0.35: these thresholds give stages 1, 2, 3, 3.
THRESHOLDS = (0.9, 0.7)
LATENT_TOKENS = (SIZE // 16) ** 2


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def reference(seed: int, size=(48, 40)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "internvl", family="internvl", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_path):
    pipeline = SqueezePipeline.from_pretrained(tiny_path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def references():
    return [reference(0, (48, 40)), reference(1, (32, 64))]


@pytest.fixture(scope="module")
def subject(pipe, references):
    return pipe.encode_subject(references, reference_size=SIZE)


def run(pipe, prompt="a dog on the beach", seeds=(0,), **kwargs):
    args = dict(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        stage_thresholds=THRESHOLDS,
        reference_size=SIZE,
        output_type="np",
        generator=generators(*seeds),
    )
    args.update(kwargs)
    return pipe(prompt, **args)


class TransformerInputs:
    """Records what the transformer receives at each call (sequence lengths, ids)."""

    def __init__(self, transformer):
        self.calls = []
        self.handle = transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append(
            {
                "image_tokens": kwargs["hidden_states"].shape[1],
                "condition_tokens": kwargs["encoder_hidden_states"].shape[1],
                "img_ids": kwargs["img_ids"].clone(),
                "mask": (kwargs.get("joint_attention_kwargs") or {}).get("attention_mask"),
            }
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_layout_on_disk(tiny_path):
    index = json.loads((tiny_path / "model_index.json").read_text())
    assert index["_class_name"] == "SqueezePipeline"
    assert index["aggregator"] == ["squeeze_cli.pipelines.aggregator", "DualLayerAggregator"]
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["mllm"] == ["transformers", "InternVLForConditionalGeneration"]
    for folder in ("mllm", "tokenizer", "image_processor", "aggregator", "transformer", "vae", "scheduler"):
        assert (tiny_path / folder).is_dir()
    assert (tiny_path / "aggregator" / "diffusion_pytorch_model.safetensors").is_file()


def test_tiny_build_is_deterministic(tmp_path, tiny_path):
    again = build_tiny_pipeline(tmp_path / "again", family="internvl", seed=0)
    for name in (
        "aggregator/diffusion_pytorch_model.safetensors",
        "transformer/diffusion_pytorch_model.safetensors",
    ):
        assert (again / name).read_bytes() == (tiny_path / name).read_bytes()


def test_output_types_and_shapes(pipe, subject):
    out = run(pipe, ["a dog", "a dog in the snow"], seeds=(0, 1), subject_condition=subject)
    assert isinstance(out, SqueezePipelineOutput)
    assert out.images.shape == (2, SIZE, SIZE, 3) and out.images.dtype == np.float32
    assert 0.0 <= out.images.min() and out.images.max() <= 1.0
    assert out.stage_plan.stages == (1, 2, 3, 3)

    pil = run(pipe, subject_condition=subject, output_type="pil").images
    assert isinstance(pil[0], PIL.Image.Image) and pil[0].size == (SIZE, SIZE)
    pt = run(pipe, subject_condition=subject, output_type="pt").images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, SIZE, SIZE)
    latent = run(pipe, subject_condition=subject, output_type="latent").images
    assert latent.shape == (1, LATENT_TOKENS, 64)
    images, plan = run(pipe, subject_condition=subject, return_dict=False)
    assert images.shape == (1, SIZE, SIZE, 3) and plan == out.stage_plan


def test_subject_condition_shapes(pipe, subject):
    assert isinstance(subject, SubjectCondition) and subject.num_references == 2
    # 48×40 → longer side 64 → 64×48 (multiples of 16) → latent 16×8×6 ; 32×64 → 32×64 → 16×8×4.
    assert [tuple(latent.shape) for latent in subject.reference_latents] == [(16, 6, 8), (16, 8, 4)]
    assert subject.image_tokens.shape[-1] == pipe.transformer.config.joint_attention_dim
    assert subject.image_tokens.shape[0] == int(subject.prefix.image_mask.sum())
    # Only the KV cache and the aggregated image tokens are kept, not the prefix's hidden-state stack.
    assert subject.prefix.hidden_states is None


def test_the_cached_condition_is_the_full_encodings(pipe, references, subject):
    """A prompt on the subject's cached prefix (its own positions only, the prefix's image tokens
    aggregated once) gives the condition of encoding references and prompt together."""
    text = "a dog on the beach"
    embeds, pooled, _ = pipe.encode_prompt(text, subject)
    full_embeds, full_pooled = pipe.aggregator(pipe.mllm_encoder.encode(references, text))
    torch.testing.assert_close(embeds[0], full_embeds, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[0], full_pooled, atol=1e-5, rtol=1e-5)


def test_a_batch_of_different_lengths_masks_the_padding(pipe, subject):
    # That the batch then equals its prompts one by one is checked for every pipeline in
    # tests/test_pipeline_contract.py.
    prompts = ["a dog", "a red backpack in the snow with a mountain in the background", "a cat on a sofa"]
    with TransformerInputs(pipe.transformer) as seen:
        run(pipe, prompts, seeds=(3, 4, 5), subject_condition=subject)
    mask = seen.calls[0]["mask"]
    assert mask is not None and mask.shape[0] == 3 and not mask.all()


def test_precomputed_embeddings_and_reference_latents(pipe, subject):
    expected = run(pipe, subject_condition=subject, seeds=(2,)).images
    embeds, pooled, mask = pipe.encode_prompt("a dog on the beach", subject)
    assert (
        mask is None
        and embeds.ndim == 3
        and pooled.shape == (1, pipe.transformer.config.pooled_projection_dim)
    )
    out = run(
        pipe,
        None,
        seeds=(2,),
        prompt_embeds=embeds,
        pooled_prompt_embeds=pooled,
        reference_latents=subject.reference_latents,
    ).images
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_reference_tokens_follow_the_stage_plan(pipe, subject):
    reference_tokens = sum(latent.shape[-1] * latent.shape[-2] // 4 for latent in subject.reference_latents)
    null_length = pipe.encode_null_condition()[0].shape[0]
    prompt_length = pipe.encode_prompt("a dog on the beach", subject)[0].shape[1]
    assert null_length != prompt_length

    with TransformerInputs(pipe.transformer) as seen:
        out = run(pipe, subject_condition=subject)
    plan = out.stage_plan
    assert plan.stages == (1, 2, 3, 3)
    assert [c["image_tokens"] for c in seen.calls] == [
        LATENT_TOKENS,  # σ ≥ τ1: the reference tokens are not in the sequence at all
        LATENT_TOKENS + reference_tokens,
        LATENT_TOKENS + reference_tokens,
        LATENT_TOKENS + reference_tokens,
    ]
    # Stage 3 swaps the MLLM condition for the null condition.
    assert [c["condition_tokens"] for c in seen.calls] == [
        prompt_length,
        prompt_length,
        null_length,
        null_length,
    ]
    # Kontext-style ids: first axis 0 for the target, 1 and 2 for the two references.
    ids = seen.calls[1]["img_ids"]
    assert ids[:LATENT_TOKENS, 0].eq(0).all()
    first = subject.reference_latents[0].shape[-1] * subject.reference_latents[0].shape[-2] // 4
    assert ids[LATENT_TOKENS : LATENT_TOKENS + first, 0].eq(1).all()
    assert ids[LATENT_TOKENS + first :, 0].eq(2).all()
    # The scheduler stepped through exactly the σ the plan compared against the thresholds.
    assert plan == stage_plan(STEPS, SIZE, SIZE, THRESHOLDS, pipe.scheduler.config, pipe.vae_scale_factor)
    assert torch.equal(pipe.scheduler.sigmas[:-1], torch.tensor(plan.shifted_sigmas))


def test_keep_mllm_condition(pipe, subject):
    prompt_length = pipe.encode_prompt("a dog on the beach", subject)[0].shape[1]
    with TransformerInputs(pipe.transformer) as seen:
        kept = run(pipe, subject_condition=subject, keep_mllm_condition=True).images
    assert {c["condition_tokens"] for c in seen.calls} == {prompt_length}
    assert np.abs(kept - run(pipe, subject_condition=subject).images).max() > 1e-4


def test_zero_thresholds_never_use_references(pipe, subject):
    with TransformerInputs(pipe.transformer) as seen:
        out = run(pipe, subject_condition=subject, stage_thresholds=(0.0, 0.0))
    assert out.stage_plan.counts == (STEPS, 0, 0)
    assert {c["image_tokens"] for c in seen.calls} == {LATENT_TOKENS}
    # MLLM-only generation also works without any references.
    assert run(pipe, stage_thresholds=(0.0, 0.0)).images.shape == (1, SIZE, SIZE, 3)


def test_null_condition_is_computed_once(pipe, subject, monkeypatch):
    pipe.encode_null_condition()
    calls = []
    original = pipe.mllm_encoder.encode_null
    monkeypatch.setattr(pipe.mllm_encoder, "encode_null", lambda: calls.append(1) or original())
    run(pipe, subject_condition=subject)
    run(pipe, subject_condition=subject, seeds=(1,))
    assert calls == []


def test_num_images_per_prompt_and_callback(pipe, subject):
    steps = []

    def callback(pipeline, step, timestep, callback_kwargs):
        steps.append((step, callback_kwargs["latents"].shape))
        return {}

    out = run(
        pipe,
        ["a dog", "a cat"],
        seeds=(0, 1, 2, 3),
        subject_condition=subject,
        num_images_per_prompt=2,
        callback_on_step_end=callback,
    )
    assert out.images.shape == (4, SIZE, SIZE, 3)
    assert steps == [(i, (4, LATENT_TOKENS, 64)) for i in range(STEPS)]


def test_true_cfg_runs_a_negative_pass_on_mllm_steps(pipe, subject):
    with TransformerInputs(pipe.transformer) as seen:
        guided = run(pipe, subject_condition=subject, true_cfg_scale=3.0, negative_prompt="blurry").images
    # Stages 1 and 2 use the MLLM condition (two passes); stage 3 uses the null condition (one pass).
    assert len(seen.calls) == 2 + 2 + 1 + 1
    assert np.abs(guided - run(pipe, subject_condition=subject).images).max() > 1e-4


def test_guidance_scale_reaches_the_transformer(pipe, subject):
    a = run(pipe, subject_condition=subject, guidance_scale=2.5).images
    b = run(pipe, subject_condition=subject, guidance_scale=4.0).images
    assert np.abs(a - b).max() > 1e-5


def test_save_load_round_trip(pipe, subject, tmp_path):
    expected = run(pipe, subject_condition=subject, seeds=(5,)).images
    pipe.save_pretrained(tmp_path / "saved")
    loaded = SqueezePipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.aggregator, DualLayerAggregator)
    references = [reference(0, (48, 40)), reference(1, (32, 64))]
    out = run(loaded, reference_images=references, seeds=(5,)).images
    np.testing.assert_allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize("variant", [{"layers": [-1]}, {"single_lap": True}])
def test_aggregator_variants_build_and_run(variant, references):
    components = build_tiny_components("internvl", seed=0)
    base = components["aggregator"].config
    components["aggregator"] = DualLayerAggregator(
        num_hidden_states=base.num_hidden_states,
        mllm_hidden_size=base.mllm_hidden_size,
        width=base.width,
        num_heads=base.num_heads,
        joint_attention_dim=base.joint_attention_dim,
        pooled_projection_dim=base.pooled_projection_dim,
        **variant,
    )
    pipeline = SqueezePipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    out = run(pipeline, reference_images=references)
    assert out.images.shape == (1, SIZE, SIZE, 3) and np.isfinite(out.images).all()


def test_lora_in_diffusers_format_loads_and_changes_the_output(tiny_path, subject, tmp_path):
    import logging

    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    # Make a LoRA the way a trainer would, and save it with diffusers' own writer.
    transformer = FluxTransformer2DModel.from_pretrained(tiny_path / "transformer")
    config = LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    transformer.add_adapter(config)
    SqueezePipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(transformer)
    )
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").is_file()

    pipeline = SqueezePipeline.from_pretrained(tiny_path)
    pipeline.set_progress_bar_config(disable=True)
    before = run(pipeline, subject_condition=subject).images
    warnings: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = warnings.append  # type: ignore[method-assign]
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root
    try:
        pipeline.load_lora_weights(tmp_path / "lora")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    # There is no text encoder to load a LoRA into: no "No LoRA keys associated to NoneType" on every gen.
    assert not warnings, [record.getMessage() for record in warnings]
    with_lora = run(pipeline, subject_condition=subject).images
    assert np.abs(with_lora - before).max() > 1e-3
    pipeline.unload_lora_weights()
    np.testing.assert_allclose(run(pipeline, subject_condition=subject).images, before, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"height": 60}, "height"),
        ({"width": 0}, "width"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"stage_thresholds": (0.5, 0.9)}, "stage_thresholds"),
        ({"reference_size": 30}, "reference_size"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"prompt_embeds": torch.zeros(1, 3, 32)}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": None, "prompt_embeds": torch.zeros(1, 3, 32)}, "pooled_prompt_embeds"),
        ({"reference_images": [reference(0)]}, "reference_images"),
        ({"reference_latents": [torch.zeros(4, 4, 4)]}, "reference_latents"),
        ({"subject_condition": "dog"}, "subject_condition"),
        ({"negative_prompt": ["a", "b"]}, "negative_prompt"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
        ({"generator": generators(0, 1)}, "generators"),
    ],
)
def test_check_inputs(pipe, subject, kwargs, name):
    args = {"prompt": ["a dog"], "subject_condition": subject, **kwargs}
    if "reference_images" in kwargs or "reference_latents" in kwargs:
        args["subject_condition"] = subject  # conflicts with the condition
    if kwargs.get("subject_condition") == "dog":
        args["subject_condition"] = "dog"
    prompt = args.pop("prompt")
    with pytest.raises(ValueError, match=name):
        run(pipe, prompt, **args)


def test_references_required_when_the_plan_uses_them(pipe):
    with pytest.raises(ValueError, match="stage_thresholds"):
        run(pipe)
