"""`step_cache` on the pipelines other than squeeze's (its staged one is in tests/test_step_cache.py): each
method a pipeline's registry row lists runs on its tiny twin, skips transformer passes and keeps the images
close to exact sampling; a method it cannot run is refused at validation and by the pipeline. That
`step_cache` absent leaves the pixels as they were is the equality with diffusers' own pipelines
(tests/test_pipelines_kontext.py, test_pipelines_qwen_image_edit.py, test_pipelines_flux2.py)."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from squeeze_cli.errors import ManifestError
from squeeze_cli.loading import load_pipeline
from squeeze_cli.manifest.resolve import load_manifest
from squeeze_cli.manifest.schema import ModelSpec
from squeeze_cli.params import StepCache, StepCacheMethod
from squeeze_cli.pipelines.contract import PROBE_PROMPT, SubjectBatchMixin, TransformerPasses, probe_reference
from squeeze_cli.pipelines.registry import PIPELINES

NAMES = tuple(name for name in sorted(PIPELINES) if name != "squeeze")
STEPS = 8
SIZE = {"height": 32, "width": 48}
# Settings that skip on the random twins: First Block Cache skips when the first block's output moved by
# less than the threshold (a random model's moves a lot); TaylorSeer runs one pass in two after the first.
CACHES = {
    StepCacheMethod.first_block.value: StepCache("first_block", threshold=0.9),
    StepCacheMethod.taylorseer.value: StepCache("taylorseer", interval=2, warmup_steps=1, order=1),
}


CASES = [
    pytest.param(name, method, id=f"{name}-{method}")
    for name in NAMES
    for method in sorted(PIPELINES[name].step_cache_methods)
]


@pytest.fixture(scope="module")
def pipes():
    loaded: dict[str, object] = {}

    def get(name: str):
        if name not in loaded:
            spec = ModelSpec(builtin="tiny", pipeline_class=name, dtype="float32")
            loaded[name] = load_pipeline(spec, device="cpu")
        return loaded[name]

    return get


def reference() -> PIL.Image.Image:
    rng = np.random.default_rng(0)
    return PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def run(pipe, step_cache: StepCache | None = None) -> tuple[np.ndarray, int]:
    # Encoded first: [klein] 9B-KV runs the transformer on the references once per subject.
    subject = pipe.encode_subject([reference()], reference_size=64)
    passes = TransformerPasses(pipe.transformer)
    try:
        images = pipe(
            ["a dog", "a dog in the snow"],
            subject_condition=subject,
            num_inference_steps=STEPS,
            generator=[torch.Generator().manual_seed(seed) for seed in (0, 1)],
            output_type="np",
            step_cache=step_cache,
            **SIZE,
        ).images
    finally:
        passes.remove()
    # What the runner records: the pipeline's own count, while a cache is on.
    assert pipe.step_cache_passes == (None if step_cache is None else (passes.full, passes.calls))
    return images, passes.full


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), CASES)
def test_each_cache_skips_passes_and_stays_close(pipes, name, method):
    pipe = pipes(name)
    exact, passes = run(pipe)
    assert passes == STEPS and not pipe.transformer.is_cache_enabled
    cached, passes = run(pipe, CACHES[method])
    assert passes < STEPS
    difference = np.abs(cached - exact)
    # Not a bound (it depends on the random twin): the cache changed the image, and nothing blew up.
    assert np.isfinite(cached).all() and difference.max() > 0
    print(f"{name} {method}: {passes}/{STEPS} full passes, max |Δ| {difference.max():.4f}")
    again, _ = run(pipe, CACHES[method])
    assert np.array_equal(cached, again)  # the cache starts empty on every call
    back, passes = run(pipe)
    assert passes == STEPS and not pipe.transformer.is_cache_enabled and np.array_equal(back, exact)


@pytest.mark.slow
def test_a_subject_encoded_after_a_cached_call_is_unchanged(pipes):
    # [klein] 9B-KV runs the transformer in `encode_subject`, where the last call's cache hook must not act.
    pipe = pipes("flux2-klein-kv")
    before = pipe.encode_subject([reference()], reference_size=64).reference_kv
    run(pipe, CACHES["taylorseer"])
    after = pipe.encode_subject([reference()], reference_size=64).reference_kv
    layers = zip(
        before.double_block_caches + before.single_block_caches,
        after.double_block_caches + after.single_block_caches,
        strict=True,
    )
    for old, new in layers:
        assert all(torch.equal(a, b) for a, b in zip(old.get(), new.get(), strict=True))


def test_every_pipeline_reads_step_cache_and_flux2_takes_taylorseer_only():
    for name, spec in PIPELINES.items():
        assert "step_cache" in spec.sampling_parameters
        expected = {"taylorseer"} if name.startswith("flux2") else {"first_block", "taylorseer"}
        assert spec.step_cache_methods == expected, name


@pytest.mark.slow
def test_the_pipeline_refuses_a_method_it_cannot_run(pipes):
    pipe = pipes("flux2-klein")
    with pytest.raises(ValueError, match="cannot run step cache method 'first_block'; it takes: taylorseer"):
        run(pipe, StepCache("first_block"))


@pytest.mark.parametrize(
    ("defaults", "field"),
    [
        ("{step_cache: {method: first_block}}", "defaults.step_cache"),
        ("{step_cache: {}}", "defaults.step_cache"),  # first_block is the default method
        (
            "{for_pipeline: {flux2-dev: {step_cache: {threshold: 0.2}}}}",
            "defaults.for_pipeline.flux2-dev.step_cache",
        ),
    ],
)
def test_validation_refuses_a_method_the_pipeline_cannot_run(
    write_file, make_image, squeeze, defaults, field
):
    make_image("refs/a.png")
    path = write_file(
        f"""
        version: 1
        recipe: tiny-flux2-klein
        defaults: {defaults}
        subjects:
          - name: dog
            references: [refs/a.png]
            prompts: [a dog]
        """
    )
    result = squeeze("validate", str(path))
    assert result.code == 2, result.err
    (line,) = [line for line in result.err.splitlines() if "step cache method" in line]
    assert (
        line.startswith(f"error: {path}:")
        and f"{field}: step cache method first_block does not run on the flux2" in line
    )
    assert "use `method: taylorseer`" in line


def test_skipped_passes_are_recorded_per_image_and_per_run(write_file, make_image, squeeze, tmp_path):
    make_image("refs/a.png", size=(64, 64))
    path = write_file(
        """
        version: 1
        recipe: tiny-kontext
        defaults: {height: 32, width: 48, num_inference_steps: 6, reference_size: 64, seeds: [0, 1]}
        subjects:
          - name: dog
            references: [refs/a.png]
            prompts:
              - a dog
              - {text: a dog in the snow, step_cache: {method: taylorseer, interval: 2, warmup_steps: 1}}
        """
    )
    out = tmp_path / "out"
    result = squeeze("gen", str(path), "--out", str(out))
    assert result.code == 0, result.err
    exact = json.loads((out / "dog" / "000-s0.json").read_text())
    assert "step_cache_passes" not in exact
    cached = json.loads((out / "dog" / "001-s1.json").read_text())
    # Steps 0, 2 and 4 run, 1, 3 and 5 are forecast: 3 of the 6 passes skipped.
    assert cached["step_cache_passes"] == {"transformer_passes": 6, "skipped": 3}
    summary = json.loads((out / "run.json").read_text())
    assert summary["step_cache"] == {"images": 2, "transformer_passes": 12, "skipped": 6}


# A `skip` target instead of a threshold (issue 22) ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "field", "message"),
    [
        ("{skip: 0.4, threshold: 0.1}", "defaults.step_cache", "`threshold` and `skip` both set"),
        ("{method: taylorseer, skip: 0.4}", "defaults.step_cache", "`skip` is not a setting of"),
        ("{skip: 1}", "defaults.step_cache.skip", "less than 1"),
        ("{skip: 0}", "defaults.step_cache.skip", "greater than 0"),
    ],
)
def test_bad_skip_target_is_located(write_file, make_image, value, field, message):
    make_image("refs/a.png")
    path = write_file(
        f"""
        version: 1
        recipe: tiny
        defaults: {{step_cache: {value}}}
        subjects:
          - {{name: dog, references: [refs/a.png], prompts: [a dog]}}
        """
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    (problem,) = info.value.problems
    assert problem.field == field and message in problem.message, problem


def test_a_skip_target_is_the_job_id_and_the_threshold_is_not():
    target = StepCache("first_block", skip=0.4)
    assert target.to_dict() == {"method": "first_block", "skip": 0.4}
    assert StepCache("first_block", threshold=0.1).to_dict() == {"method": "first_block", "threshold": 0.1}


@pytest.mark.slow
def test_a_skip_target_is_calibrated_once_and_recorded(
    write_file, make_image, squeeze, tmp_path, monkeypatch
):
    monkeypatch.setenv("SQUEEZE_CACHE", str(tmp_path / "cache"))  # a fresh calibration store
    make_image("refs/a.png", size=(64, 64))
    path = write_file(
        """
        version: 1
        recipe: tiny-kontext
        defaults: {height: 32, width: 48, num_inference_steps: 8, reference_size: 64, seeds: [0]}
        subjects:
          - name: dog
            references: [refs/a.png]
            prompts: [{text: a dog, step_cache: {skip: 0.5}}]
        """
    )
    probes = []
    calibrate = SubjectBatchMixin.calibrate_step_cache
    monkeypatch.setattr(
        SubjectBatchMixin,
        "calibrate_step_cache",
        lambda self, *args, **kwargs: probes.append(1) or calibrate(self, *args, **kwargs),
    )
    for run_index in range(2):
        out = tmp_path / f"out{run_index}"
        result = squeeze("gen", str(path), "--out", str(out))
        assert result.code == 0, result.err
        record = json.loads((out / "dog" / "000-s0.json").read_text())
        assert record["params"]["step_cache"] == {"method": "first_block", "skip": 0.5}
        passes = record["step_cache_passes"]
        assert 0 < passes["calibrated_threshold"] < 1 and passes["skipped"] > 0
    assert len(probes) == 1  # the second run found the calibration in the cache
    assert len(json.loads((tmp_path / "cache" / "step-cache-calibrations.json").read_text())) == 1


@pytest.mark.slow
def test_calibration_reaches_the_target_on_the_probe(pipes):
    pipe = pipes("qwen-image-edit-plus")
    sampling = {"num_inference_steps": STEPS, **SIZE}
    target = StepCache("first_block", skip=0.5)
    threshold = pipe.calibrate_step_cache(target, reference_size=64, **sampling)
    assert 0 < threshold < 1
    pipe(
        [PROBE_PROMPT],
        subject_condition=pipe.encode_subject([probe_reference()], 64),
        generator=[torch.Generator().manual_seed(0)],
        output_type="latent",
        step_cache=StepCache("first_block", threshold=threshold),
        **sampling,
    )
    full, calls = pipe.step_cache_passes
    assert calls - full >= 0.5 * calls
    with pytest.raises(ValueError, match="needs its threshold first"):
        pipe._set_step_cache(target)
