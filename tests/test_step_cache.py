"""`step_cache`: diffusers' First Block Cache and TaylorSeer, opt-in per manifest level, applied by
SqueezePipeline."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from squeeze_cli.errors import ManifestError
from squeeze_cli.gen.worker import _batches
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.outputs.records import parameters_text
from squeeze_cli.params import SamplingParams, StepCache
from squeeze_cli.pipelines.squeeze import SqueezePipeline
from squeeze_cli.pipelines.tiny import build_tiny_pipeline
from squeeze_cli.plan import job_id, plan_jobs

SIZE = 64
STEPS = 8
THRESHOLDS = (0.9, 0.7)  # at 8 steps and 64×64: stages 1, 1, 2, 2, 3, 3, 3, 3


# Manifest -------------------------------------------------------------------------------------------


def manifest(write_file, make_image, defaults: str = "", prompt_extra: str = ""):
    make_image("refs/a.png")
    return write_file(
        f"""
        version: 1
        recipe: tiny
        defaults:
          height: 64
          width: 64
          seeds: [0, 1]
        {defaults}
        subjects:
          - name: dog
            references: [refs/a.png]
            prompts:
              - a dog
              - {{text: a dog in the snow{prompt_extra}}}
        """
    )


def test_step_cache_flows_from_defaults_and_is_switched_off_by_null(write_file, make_image):
    path = manifest(
        write_file,
        make_image,
        defaults="  step_cache: {method: first_block, threshold: 0.1}",
        prompt_extra=", step_cache: null",
    )
    first, second = load_manifest(path).subjects[0].prompts
    assert first.params.step_cache == StepCache(method="first_block", threshold=0.1)
    assert second.params.step_cache is None


def test_step_cache_defaults_to_first_block_at_0_08(write_file, make_image):
    path = manifest(write_file, make_image, prompt_extra=", step_cache: {}")
    assert load_manifest(path).subjects[0].prompts[1].params.step_cache == StepCache("first_block", 0.08)


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ("{threshold: 0}", "defaults.step_cache.threshold", "must be a number in (0, 1)"),
        ("{threshold: 1.5}", "defaults.step_cache.threshold", "must be a number in (0, 1)"),
        ("{method: teacache}", "defaults.step_cache.method", "first_block"),
        ("{treshold: 0.1}", "defaults.step_cache.treshold", ""),
        ("0.1", "defaults.step_cache", ""),
        ("{method: taylorseer, threshold: 0.1}", "defaults.step_cache", "`threshold` is not a setting of"),
        ("{interval: 4}", "defaults.step_cache", "`interval` is not a setting of method first_block"),
        ("{method: taylorseer, interval: 1}", "defaults.step_cache.interval", "greater than or equal to 2"),
        ("{method: taylorseer, interval: 2.5}", "defaults.step_cache.interval", "integer"),
        ("{method: taylorseer, warmup_steps: 0}", "defaults.step_cache.warmup_steps", "greater than"),
        ("{method: taylorseer, order: 5}", "defaults.step_cache.order", "less than or equal to 4"),
    ],
)
def test_bad_step_cache_is_located(write_file, make_image, value, field, message):
    path = manifest(write_file, make_image, defaults=f"  step_cache: {value}")
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.field == field and message in problem.message


def test_taylorseer_defaults_and_settings(write_file, make_image):
    path = manifest(
        write_file,
        make_image,
        defaults="  step_cache: {method: taylorseer}",
        prompt_extra=", step_cache: {method: taylorseer, interval: 3, warmup_steps: 2, order: 2}",
    )
    first, second = load_manifest(path).subjects[0].prompts
    assert first.params.step_cache == StepCache("taylorseer", interval=5, warmup_steps=3, order=1)
    assert second.params.step_cache == StepCache("taylorseer", interval=3, warmup_steps=2, order=2)


def test_job_ids_of_exact_sampling_are_unchanged_and_the_cache_enters_them():
    exact = SamplingParams()
    assert "step_cache" not in exact.to_dict()  # job ids from before `step_cache` existed still match
    cached = replace(exact, step_cache=StepCache(threshold=0.1))
    assert cached.to_dict()["step_cache"] == {"method": "first_block", "threshold": 0.1}
    ids = {
        job_id("dog", [b"x"], "a dog", 0, params, "model")
        for params in (exact, cached, replace(exact, step_cache=StepCache(threshold=0.2)))
    }
    assert len(ids) == 3
    # Each method writes only its own settings: first_block ids did not change when taylorseer came.
    seer = replace(exact, step_cache=StepCache("taylorseer", threshold=0.1))
    settings = {"method": "taylorseer", "interval": 5, "warmup_steps": 3, "order": 1}
    assert seer.to_dict()["step_cache"] == settings
    ids |= {
        job_id("dog", [b"x"], "a dog", 0, params, "model")
        for params in (seer, replace(seer, step_cache=StepCache("taylorseer", interval=4)))
    }
    assert len(ids) == 5
    record = {"prompt": "a dog", "params": seer.to_dict(), "seed": 1}
    assert "Step cache: taylorseer interval=5 warmup_steps=3 order=1" in parameters_text(record)


def test_cached_jobs_go_one_per_batch_and_the_png_text_names_the_cache(write_file, make_image):
    path = manifest(write_file, make_image, prompt_extra=", step_cache: {threshold: 0.1}")
    jobs = plan_jobs(load_manifest(path), model_identity="m", max_jobs=100)
    sizes = [(batch[0].prompt, len(batch)) for batch in _batches(jobs, 4)]
    assert sizes == [("a dog", 2), ("a dog in the snow", 1), ("a dog in the snow", 1)]
    record = {"prompt": "a dog", "params": jobs[-1].params.to_dict(), "seed": 1}
    assert "Step cache: first_block threshold=0.1" in parameters_text(record)


def test_taylorseer_jobs_are_batched(write_file, make_image):
    # Its schedule counts steps and forecasts each image from its own outputs: batching changes nothing.
    path = manifest(write_file, make_image, prompt_extra=", step_cache: {method: taylorseer}")
    jobs = plan_jobs(load_manifest(path), model_identity="m", max_jobs=100)
    assert [len(batch) for batch in _batches(jobs, 4)] == [2, 2]


# Pipeline -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    path = build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "internvl", family="internvl", seed=0)
    pipeline = SqueezePipeline.from_pretrained(path)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def references():
    rng = np.random.default_rng(0)
    return [PIL.Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8))]


class TailCalls:
    """Counts full transformer passes: the last block runs only when the cache does not skip the step."""

    def __init__(self, transformer):
        self.count = 0
        tail = transformer.single_transformer_blocks[-1].proj_out
        self.handle = tail.register_forward_hook(self)

    def __call__(self, *args):
        self.count += 1


def run(pipe, references, prompts=("a dog",), **kwargs):
    calls = TailCalls(pipe.transformer)
    try:
        out = pipe(
            list(prompts),
            reference_images=references,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            stage_thresholds=THRESHOLDS,
            reference_size=SIZE,
            output_type="np",
            generator=[torch.Generator().manual_seed(i) for i in range(len(prompts))],
            **kwargs,
        )
    finally:
        calls.handle.remove()
    assert out.stage_plan.stages == (1, 1, 2, 2, 3, 3, 3, 3)
    return out.images, calls.count


def test_off_is_exact_before_and_after_a_cached_call(pipe, references):
    before, passes = run(pipe, references)
    assert passes == STEPS and not pipe.transformer.is_cache_enabled
    run(pipe, references, step_cache=StepCache(threshold=0.5))
    after, passes = run(pipe, references)
    assert passes == STEPS and not pipe.transformer.is_cache_enabled
    assert np.array_equal(before, after)


def test_on_skips_transformer_passes_at_a_small_pixel_cost(pipe, references):
    exact, _ = run(pipe, references)
    cached, passes = run(pipe, references, step_cache=StepCache(threshold=0.5))
    assert passes < STEPS
    difference = np.abs(cached - exact)
    # Measured on this model: 4 of 8 passes, max |Δ| ≈ 0.004, mean ≈ 0.0004 (images in [0, 1]).
    assert 0 < difference.mean() < 0.01 and difference.max() < 0.05
    # A threshold too low to skip anything gives exact sampling back.
    tight, passes = run(pipe, references, step_cache=StepCache(threshold=1e-6))
    assert passes == STEPS and np.array_equal(tight, exact)


def test_each_branch_and_stage_has_its_own_cache(pipe, references):
    # With a threshold that skips whenever it may, only the first call of each cache context runs in full:
    # one per stage for the positive branch, one per MLLM stage (1, 2) for the negative one. A context shared
    # across the stage switch would compare residuals of different sequence lengths and fail.
    _, passes = run(pipe, references, step_cache=StepCache(threshold=0.999))
    assert passes == 3
    _, passes = run(
        pipe, references, step_cache=StepCache(threshold=0.999), negative_prompt="blurry", true_cfg_scale=3.0
    )
    assert passes == 3 + 2


def test_the_cache_starts_empty_on_every_call(pipe, references):
    # A different batch size on the next call must not meet the last call's residuals.
    cache = StepCache(threshold=0.999)
    run(pipe, references, prompts=("a dog", "a cat"), step_cache=cache)
    single, passes = run(pipe, references, step_cache=cache)
    assert passes == 3
    again, _ = run(pipe, references, step_cache=cache)
    assert np.array_equal(single, again)


# TaylorSeer: a full pass every `interval` steps of each (branch, stage) context after `warmup_steps`; here
# interval 2, warmup 1 over the contexts of 2, 2 and 4 steps: full, forecast, (full, forecast) → 4 of 8.
SEER = StepCache("taylorseer", interval=2, warmup_steps=1, order=1)


def test_taylorseer_forecasts_every_other_step_at_a_small_pixel_cost(pipe, references):
    exact, _ = run(pipe, references)
    seer, passes = run(pipe, references, step_cache=SEER)
    assert passes == 4
    difference = np.abs(seer - exact)
    # Measured on this model: max |Δ| ≈ 0.02, mean ≈ 0.002 (images in [0, 1]).
    assert 0 < difference.mean() < 0.01 and difference.max() < 0.05
    again, _ = run(pipe, references, step_cache=SEER)
    assert np.array_equal(seer, again)  # the forecast state starts empty on every call
    # Warm-up longer than every stage: nothing is forecast, exact sampling back.
    none, passes = run(pipe, references, step_cache=StepCache("taylorseer", warmup_steps=4))
    assert passes == STEPS and np.array_equal(none, exact)


def test_taylorseer_images_do_not_depend_on_their_batch(pipe, references):
    batch, passes = run(pipe, references, prompts=("a dog", "a cat"), step_cache=SEER)
    assert passes == 4
    for index, prompt in enumerate(("a dog", "a cat")):
        single = pipe(
            prompt,
            reference_images=references,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            stage_thresholds=THRESHOLDS,
            reference_size=SIZE,
            output_type="np",
            generator=torch.Generator().manual_seed(index),
            step_cache=SEER,
        ).images[0]
        np.testing.assert_allclose(batch[index], single, atol=1e-4)


def test_switching_methods_replaces_the_hook(pipe, references):
    exact, _ = run(pipe, references)
    first_block, _ = run(pipe, references, step_cache=StepCache(threshold=0.999))
    seer, passes = run(pipe, references, step_cache=SEER)
    assert passes == 4 and type(pipe.transformer._cache_config).__name__ == "TaylorSeerCacheConfig"
    again, passes = run(pipe, references, step_cache=StepCache(threshold=0.999))
    assert passes == 3 and np.array_equal(again, first_block)
    back, passes = run(pipe, references)
    assert passes == STEPS and not pipe.transformer.is_cache_enabled and np.array_equal(back, exact)
