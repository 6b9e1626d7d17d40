"""The contract every registered pipeline meets, checked on its tiny twin as its `builtin: tiny` recipe loads
it (docs/architecture.md, "A pipeline"; the runner's side is squeeze_cli/gen/runner.py).

Parametrised over `squeeze_cli.pipelines.registry.PIPELINES`, and for a pipeline that takes `model.family`
over every MLLM family of `params.FAMILY_ADAPTERS`: a new registry row is checked here without editing this
file, and has to come with its tiny builder and a packaged recipe (`builtin: tiny`, `pipeline_class:` its
name). Per pipeline:

- contract shape: the class the registry names, its `sampling_parameters`, `encode_subject` and `__call__`
  taking what the runner passes, `.images` and `.stage_plan` out;
- deterministic: the same prompts and seeds (one CPU generator per image) give the same pixels;
- a batch equals its prompts one by one (docs/pipeline.md), with true CFG too where the pipeline reads it;
- `reference_images=` equals a precomputed `subject_condition=`, bit for bit;
- `callback_on_step_end` runs once per step with the latents, and latents it returns are used;
- `prepare_prompts` (where there is one) leaves the images as they are and the text side idle in `__call__`;
- `check_prompt_fits` (where there is one) refuses a prompt far too long;
- `squeeze validate` refuses every sampling key the pipeline does not read, naming it;
- `squeeze gen` records the pipeline in every sidecar and PNG, and resuming a finished run is a no-op;
- (slow) two processes give the pixels of one.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest

from squeeze_cli.params import FAMILY_ADAPTERS, SAMPLING_KEYS, SamplingParams
from squeeze_cli.pipelines.contract import SubjectPipeline
from squeeze_cli.pipelines.registry import DEFAULT_PIPELINE, PIPELINES, PipelineSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_IMAGES = REPO / "examples" / "images"

# The recipe's defaults, at a small non-square size (the runner passes height and width separately).
SIZE = {"height": 32, "width": 48}
# Different lengths, so that a batch pads its conditions (docs/pipeline.md, "Batches").
PROMPTS = (
    "a dog",
    "a red backpack in the snow with a mountain in the background",
    "a cat wearing a santa hat, sitting on a sofa",
)
SEEDS = (3, 4, 5)
# docs/pipeline.md: "a batch equals the same prompts one by one within float tolerance (tested at 1e-4)":
# padded conditions are masked, which is exact in theory; the batched matmuls round differently.
BATCH_TOLERANCE = 1e-4
TRUE_CFG = {"true_cfg_scale": 3.0, "negative_prompt": "blurry, out of focus"}

# A valid manifest value for every sampling key: `squeeze validate` is run with each key a pipeline ignores.
KEY_VALUES = {
    "num_inference_steps": "2",
    "guidance_scale": "3.0",
    "height": "32",
    "width": "32",
    "stage_thresholds": "[0.9, 0.8]",
    "keep_mllm_condition": "true",
    "true_cfg_scale": "2.0",
    "negative_prompt": "blurry",
    "reference_size": "32",
    "step_cache": "{method: taylorseer, interval: 4}",  # the method every pipeline runs (FLUX.2: only it)
}

MANIFEST = """\
version: 1
recipe: {recipe}
{model}defaults:
  height: 32
  width: 48
  seeds: [0, 1]{extra}
subjects:
  - name: dog
    class: dog
    references: [images/dog/*.jpg]
    prompts:
      - a {{class}} in the snow
      - a {{class}} on the beach, in the sun
  - name: backpack
    class: backpack
    references: [images/backpack/00.jpg]
    prompts:
      - a {{class}} on a table
"""
NUM_JOBS = 6


# ----------------------------------------------------------------------------------------------------------
# The twins: one per registered pipeline (per MLLM family for a pipeline that takes `model.family`)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One tiny twin: its registry row, the packaged recipe that runs it, its MLLM family if it has one."""

    spec: PipelineSpec
    family: str | None

    @property
    def id(self) -> str:
        return self.spec.name if self.family is None else f"{self.spec.name}-{self.family}"

    @property
    def recipe(self) -> Any:
        return tiny_recipe(self.spec.name)

    @property
    def model(self) -> Any:
        """The recipe's model section, with this case's family."""
        model = self.recipe.model
        return model if self.family is None else model.model_copy(update={"family": self.family})

    @property
    def manifest_model(self) -> str:
        """The manifest's `model:` line choosing this case's family (none for the recipe's own)."""
        if self.family in (None, self.recipe.model.family):
            return ""
        return f"model: {{family: {self.family}}}\n"


def cases() -> Iterator[Any]:
    for _, spec in sorted(PIPELINES.items()):
        for family in sorted(FAMILY_ADAPTERS) if spec.takes_components else [None]:
            case = Case(spec, family)
            yield pytest.param(case, id=case.id)


@cache
def tiny_recipes() -> dict[str, list[Any]]:
    """The packaged `builtin: tiny` recipes, by the pipeline they run."""
    from squeeze_cli.manifest.recipes import list_recipes

    found: dict[str, list[Any]] = {}
    for recipe in list_recipes():
        if recipe.model.builtin == "tiny":
            found.setdefault(recipe.model.pipeline_class or DEFAULT_PIPELINE, []).append(recipe)
    return found


def tiny_recipe(name: str) -> Any:
    recipes = tiny_recipes().get(name)
    if not recipes:
        pytest.fail(
            f"the registered pipeline {name!r} has no packaged recipe with `builtin: tiny` and "
            f"`pipeline_class: {name}`: add one to recipes/ (see recipes/tiny-kontext.yaml)"
        )
    return recipes[0]


@pytest.fixture(scope="module", params=list(cases()))
def case(request) -> Case:
    return request.param


@dataclass
class Twin:
    """A loaded tiny twin, with the sampling keyword arguments the runner would pass for its recipe."""

    case: Case
    pipe: Any
    sampling: dict[str, Any]
    references: list[PIL.Image.Image]
    subject: Any

    @property
    def steps(self) -> int:
        return self.sampling["num_inference_steps"]


def reference(seed: int, size: tuple[int, int]) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def generators(seeds: Sequence[int]) -> list[Any]:
    import torch

    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


@pytest.fixture(scope="module")
def twin(case: Case) -> Twin:
    from squeeze_cli.loading import load_pipeline

    pipe = load_pipeline(case.model, device="cpu")  # as `squeeze gen` loads it
    pipe.set_progress_bar_config(disable=True)
    # As the runner: every key the pipeline reads, from the recipe's defaults over SamplingParams' own.
    params = SamplingParams(**{**case.recipe.defaults.explicit(), **SIZE})
    used = case.spec.sampling_parameters
    sampling = {key: value for key, value in params.to_pipeline_kwargs().items() if key in used}
    references = [reference(0, (48, 40)), reference(1, (32, 64))]  # two aspects, neither the output's
    subject = pipe.encode_subject(references, reference_size=sampling["reference_size"])
    return Twin(case, pipe, sampling, references, subject)


def run(twin: Twin, prompts: Sequence[str], seeds: Sequence[int], subject: Any = None, **kwargs) -> Any:
    """`pipe(...)` as the runner calls it (keywords, one generator per image), as float pixels."""
    args = {"subject_condition": twin.subject if subject is None else subject}
    args.update(twin.sampling, output_type="np", **kwargs)
    return twin.pipe(prompt=list(prompts), generator=generators(seeds), **args).images


# ----------------------------------------------------------------------------------------------------------
# The pipeline object
# ----------------------------------------------------------------------------------------------------------


def test_every_registered_pipeline_has_a_tiny_recipe(case: Case) -> None:
    recipe = case.recipe
    assert recipe.model.dtype == "float32", "a tiny recipe runs in float32 (CPU, exact comparisons)"
    assert set(recipe.defaults.explicit()) <= case.spec.sampling_parameters


def test_the_pipeline_meets_the_contract_shape(twin: Twin) -> None:
    spec, pipe = twin.case.spec, twin.pipe
    assert type(pipe) is spec.load_class() and type(pipe).__name__ == spec.class_name
    assert isinstance(pipe, SubjectPipeline)  # every member of the Protocol the runner types it by
    assert type(pipe).sampling_parameters == spec.sampling_parameters
    assert spec.sampling_parameters <= set(SAMPLING_KEYS)

    called = inspect.signature(type(pipe).__call__).parameters
    if not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in called.values()):
        runner_passes = {"prompt", "subject_condition", "generator", "callback_on_step_end"}
        missing = (runner_passes | {"reference_images"} | spec.sampling_parameters) - set(called)
        assert not missing, f"{spec.class_name}.__call__ lacks {sorted(missing)}"
    assert {"reference_images", "reference_size"} <= set(inspect.signature(pipe.encode_subject).parameters)
    for optional in ("check_prompt_fits", "prepare_prompts"):
        assert callable(getattr(pipe, optional, None)) or not hasattr(pipe, optional)

    # What the runner saves: PIL images of the asked size, and the stage plan of a staged pipeline.
    out = pipe(
        prompt=["a dog", "a cat"],
        subject_condition=twin.subject,
        generator=generators((0, 1)),
        **twin.sampling,
    )
    assert len(out.images) == 2
    assert all(isinstance(image, PIL.Image.Image) and image.size == (48, 32) for image in out.images)
    staged = "stage_thresholds" in spec.sampling_parameters
    assert (out.stage_plan is not None) == staged
    if staged:
        assert len(out.stage_plan.stages) == twin.steps and out.stage_plan.to_dict()


def test_the_same_seeds_give_the_same_pixels(twin: Twin) -> None:
    first = run(twin, PROMPTS[:2], SEEDS[:2])
    assert first.shape == (2, 32, 48, 3) and np.isfinite(first).all()
    np.testing.assert_array_equal(run(twin, PROMPTS[:2], SEEDS[:2]), first)
    # The seed reaches the noise: the generator is not ignored.
    assert np.abs(run(twin, PROMPTS[:1], SEEDS[1:2])[0] - first[0]).max() > 1e-4


def test_a_batch_equals_its_prompts_one_by_one(twin: Twin) -> None:
    variants = {"recipe defaults": {}}
    if "true_cfg_scale" in twin.case.spec.sampling_parameters:
        variants["true CFG with a negative prompt"] = TRUE_CFG
    for variant, kwargs in variants.items():
        batch = run(twin, PROMPTS, SEEDS, **kwargs)
        for i, (prompt, seed) in enumerate(zip(PROMPTS, SEEDS, strict=True)):
            single = run(twin, [prompt], [seed], **kwargs)
            np.testing.assert_allclose(batch[i], single[0], atol=BATCH_TOLERANCE, rtol=0, err_msg=variant)
    if len(variants) > 1:  # and true CFG does something
        plain, guided = run(twin, PROMPTS[:1], SEEDS[:1]), run(twin, PROMPTS[:1], SEEDS[:1], **TRUE_CFG)
        assert np.abs(plain - guided).max() > 1e-4


def test_reference_images_equal_a_precomputed_subject_condition(twin: Twin) -> None:
    precomputed = twin.pipe.encode_subject(twin.references, twin.sampling["reference_size"])
    cached = run(twin, PROMPTS[:1], SEEDS[:1], subject=precomputed)
    args = {**twin.sampling, "output_type": "np"}
    direct = twin.pipe(
        prompt=list(PROMPTS[:1]), reference_images=twin.references, generator=generators(SEEDS[:1]), **args
    ).images
    np.testing.assert_array_equal(direct, cached)


def test_callbacks_run_once_per_step_and_their_latents_are_used(twin: Twin) -> None:
    base = run(twin, PROMPTS[:1], SEEDS[:1])
    seen: list[tuple[int, bool]] = []

    def record(pipe, step, timestep, callback_kwargs):
        seen.append((step, "latents" in callback_kwargs))
        return callback_kwargs  # as the runner's progress callback does

    np.testing.assert_array_equal(run(twin, PROMPTS[:1], SEEDS[:1], callback_on_step_end=record), base)
    assert seen == [(step, True) for step in range(twin.steps)]

    def zero_last_latents(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        return {"latents": latents * 0 if step == twin.steps - 1 else latents}

    changed = run(twin, PROMPTS[:1], SEEDS[:1], callback_on_step_end=zero_last_latents)
    assert np.abs(changed - base).max() > 1e-4


class ComponentCalls:
    """The names of the pipeline's torch components any of whose modules ran, while active."""

    def __init__(self, pipe: Any):
        import torch

        self.modules = {
            name: component
            for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module)
        }
        self.ran: set[str] = set()
        self.handles: list[Any] = []

    def __enter__(self) -> ComponentCalls:
        for name, component in self.modules.items():
            for module in component.modules():
                self.handles.append(
                    module.register_forward_pre_hook(lambda *_, name=name: self.ran.add(name))
                )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def test_prepared_prompts_give_the_same_images_and_leave_the_encoders_idle(twin: Twin) -> None:
    pipe = twin.pipe
    if not hasattr(pipe, "prepare_prompts"):
        pytest.skip(f"{twin.case.spec.class_name} has no prepare_prompts (optional)")
    # Prompts no other check runs, on a fresh subject: nothing of them is cached anywhere yet.
    prompts = ["the teapot floating in an ocean of milk", "a dog on top of a wooden table, in the jungle"]
    subject = pipe.encode_subject(twin.references, twin.sampling["reference_size"])
    # A first call may compute what a pipeline keeps for every subject (the squeeze pipeline's null
    # condition), once; it is not a prompt's.
    run(twin, ["warm up"], [0], subject=subject)
    # The runner prepares the prompts of the batches to come; the negative prompt is one of them here.
    negative = twin.sampling.get("negative_prompt")
    with ComponentCalls(pipe) as preparing:
        pipe.prepare_prompts(subject, prompts + ([negative] if negative else []))
    assert preparing.ran, "prepare_prompts ran no component: nothing was encoded"
    with ComponentCalls(pipe) as calling:
        prepared = run(twin, prompts, SEEDS[:2], subject=subject)
    assert not calling.ran & preparing.ran, f"__call__ ran {sorted(calling.ran & preparing.ran)} again"

    # The same prompts on a fresh subject, not prepared: the same pixels.
    fresh = pipe.encode_subject(twin.references, twin.sampling["reference_size"])
    np.testing.assert_array_equal(prepared, run(twin, prompts, SEEDS[:2], subject=fresh))


def test_a_prompt_far_too_long_is_refused_by_check_prompt_fits(twin: Twin) -> None:
    check = getattr(twin.pipe, "check_prompt_fits", None)
    if check is None:
        pytest.skip(f"{twin.case.spec.class_name} has no check_prompt_fits (optional)")
    sizes = [image.size for image in twin.references]
    check(sizes, ["a dog on the beach"])
    with pytest.raises(ValueError, match="(?i)shorten"):
        check(sizes, ["a dog on the beach " * 600])


# ----------------------------------------------------------------------------------------------------------
# Through the command line: validate, gen, resume
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("contract")
    shutil.copytree(EXAMPLE_IMAGES, folder / "images")
    return folder


def unused_keys() -> Iterator[Any]:
    for name, spec in sorted(PIPELINES.items()):
        for key in SAMPLING_KEYS:
            if key not in spec.sampling_parameters:
                yield pytest.param(name, key, id=f"{name}-{key}")


def validate_with(project: Path, squeeze, name: str, keys: Sequence[str], file: str) -> tuple[Any, Path]:
    missing = [key for key in keys if key not in KEY_VALUES]
    if missing:
        pytest.fail(f"add a manifest value for the sampling key(s) {missing} to KEY_VALUES")
    extra = "".join(f"\n  {key}: {KEY_VALUES[key]}" for key in keys)
    manifest = project / file
    manifest.write_text(MANIFEST.format(recipe=tiny_recipe(name).name, model="", extra=extra))
    return squeeze("validate", str(manifest)), manifest


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_key_the_pipeline_reads_validates(project: Path, squeeze, name: str) -> None:
    keys = sorted(PIPELINES[name].sampling_parameters - set(SIZE))  # the manifest sets the size already
    result, _ = validate_with(project, squeeze, name, keys, f"reads-{name}.yaml")
    assert result.code == 0, result.err


@pytest.mark.parametrize(("name", "key"), list(unused_keys()))
def test_a_key_the_pipeline_ignores_is_refused_at_validation(
    project: Path, squeeze, name: str, key: str
) -> None:
    result, manifest = validate_with(project, squeeze, name, [key], f"unused-{name}-{key}.yaml")
    assert result.code == 2, result.err
    line = 1 + MANIFEST.splitlines().index("  seeds: [0, 1]{extra}") + 1
    recipe = tiny_recipe(name).name
    message = f"defaults.{key}: `{key}` is not used by the {name} pipeline (recipe {recipe})"
    assert result.err.startswith(f"error: {manifest}:{line}:") and message in result.err


@dataclass(frozen=True)
class GenRun:
    """A finished one-process `squeeze gen` of a twin: its manifest, output folder and image pixels."""

    manifest: Path
    out: Path
    pixels: dict[str, str]  # image path (relative) -> sha256 of its RGB pixels


def image_paths(out: Path) -> list[Path]:
    return sorted(out.glob("*/[0-9]*-s*.png"))


def pixel_hashes(out: Path) -> dict[str, str]:
    return {
        str(path.relative_to(out)): hashlib.sha256(PIL.Image.open(path).convert("RGB").tobytes()).hexdigest()
        for path in image_paths(out)
    }


@pytest.fixture(scope="module")
def manifest(case: Case, project: Path) -> Path:
    """The two-subject manifest (two references, then one) run by the case's tiny recipe."""
    path = project / f"m-{case.id}.yaml"
    path.write_text(MANIFEST.format(recipe=case.recipe.name, model=case.manifest_model, extra=""))
    return path


@pytest.fixture(scope="module")
def one_process(case: Case, manifest: Path, squeeze) -> GenRun:
    out = manifest.parent / f"out-{case.id}"
    result = squeeze("gen", str(manifest), "--out", str(out), "--quiet")
    assert result.code == 0, result.err[-3000:]
    return GenRun(manifest, out, pixel_hashes(out))


def test_gen_records_the_pipeline_in_every_image(case: Case, one_process: GenRun) -> None:
    from sd_parsers import ParserManager

    spec, out = case.spec, one_process.out
    assert len(one_process.pixels) == NUM_JOBS
    assert (out / "dog" / "grid-001.png").is_file() and (out / "backpack" / "contact-sheet.png").is_file()
    for png in image_paths(out):
        record = json.loads(png.with_suffix(".json").read_text())
        assert record["preset"] == case.recipe.name
        assert len(record["references"]) == (2 if record["subject"] == "dog" else 1)
        assert record["pipeline"] == {
            "name": spec.name,
            "class": spec.class_name,
            "distilled_guidance": spec.distilled_guidance,
            "sampling_parameters": sorted(spec.sampling_parameters),
            "reference_sizing": spec.reference_sizing,
        }
        assert (record["model"]["pipeline_class"] or DEFAULT_PIPELINE) == spec.name
        assert record["model"]["family"] == case.family
        # The params recorded are the ones the pipeline read (`step_cache` is written only when on).
        assert set(record["params"]) <= spec.sampling_parameters
        assert spec.sampling_parameters - set(record["params"]) <= {"step_cache"}
        assert (record["stage_plan"] is not None) == ("stage_thresholds" in spec.sampling_parameters)

    record = json.loads((out / "dog" / "000-s0.json").read_text())
    info = ParserManager().parse(out / "dog" / "000-s0.png")
    sampler, params = info.samplers[0], record["params"]
    assert info.generator.name == "AUTOMATIC1111" and sampler.parameters["seed"] == "0"
    assert info.metadata["Pipeline"] == spec.class_name
    # FLUX's distilled guidance is not CFG: written as Forge's `Distilled CFG Scale`, never as `CFG scale`.
    assert ("Distilled CFG Scale" in info.metadata) == spec.distilled_guidance
    true_cfg = params.get("true_cfg_scale", 1.0) > 1 and bool(params.get("negative_prompt"))
    assert sampler.parameters["cfg_scale"] == (str(params["true_cfg_scale"]) if true_cfg else "1")


def test_the_resolved_manifest_replans_the_same_jobs(case: Case, one_process: GenRun, squeeze) -> None:
    from squeeze_cli.manifest import load_manifest
    from squeeze_cli.plan import plan_jobs

    resolved = one_process.out / "manifest.resolved.yaml"
    text = resolved.read_text()
    for key in set(SAMPLING_KEYS) - case.spec.sampling_parameters:
        assert f"{key}:" not in text, f"the resolved manifest sets {key}, which {case.spec.name} ignores"
    assert squeeze("validate", str(resolved)).code == 0

    def job_ids(path: Path) -> list[str]:
        manifest = load_manifest(path)
        return [
            job.job_id for job in plan_jobs(manifest, model_identity=manifest.model_identity, max_jobs=100)
        ]

    assert job_ids(resolved) == job_ids(one_process.manifest)


def test_resuming_a_finished_run_is_a_no_op(one_process: GenRun, squeeze) -> None:
    out = one_process.out
    files = [
        *image_paths(out),
        *(p.with_suffix(".json") for p in image_paths(out)),
        *out.glob("*/*grid*.png"),
    ]
    files += [*out.glob("*/contact-sheet*.png"), out / "index.jsonl"]
    before = {path: (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) for path in files}

    result = squeeze("gen", str(one_process.manifest), "--out", str(out), "--json")
    assert result.code == 0, result.err[-3000:]
    events = [json.loads(line) for line in result.out.splitlines()]
    started = [event for event in events if event["event"] == "run_started"]
    assert len(started) == 1 and started[0]["jobs"] == 0 and started[0]["skipped"] == NUM_JOBS
    assert not [event for event in events if event["event"].startswith("job_")]
    summary = events[-1]
    assert summary["event"] == "run_summary"
    assert summary["jobs"] == {"planned": NUM_JOBS, "skipped": NUM_JOBS, "succeeded": 0, "failed": 0}

    after = {path: (path.read_bytes(), path.stat().st_ino, path.stat().st_mtime_ns) for path in files}
    changed = [str(path.relative_to(out)) for path in files if after[path] != before[path]]
    assert not changed, f"a resume with nothing to do touched {changed}"
    assert pixel_hashes(out) == one_process.pixels


# ----------------------------------------------------------------------------------------------------------
# Two processes (slow)
# ----------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_pixels_of_one(manifest: Path, case: Case) -> None:
    # Both runs in fresh processes with MKL's conditional numerical reproducibility on. Without it, MKL's
    # sgemm may round a last bit differently with the memory alignment of its operands, and that differs
    # between the runs: one process keeps the weights as views of the mmap'd safetensors (tiny-kontext's
    # transformer at 24 bytes past a 64-byte boundary), the processes of `accelerate launch` have them
    # copied (aligned), enough to put one pixel of a tiny-kontext image one level off.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_CBWR": "COMPATIBLE"}
    one, two = manifest.parent / f"one-{case.id}", manifest.parent / f"two-{case.id}"
    gen = ["-m", "squeeze_cli", "gen", str(manifest), "--quiet", "--out"]
    launch = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    for command in ([*gen, str(one)], [*launch, *gen, str(two)]):
        result = subprocess.run(
            [sys.executable, *command], capture_output=True, text=True, env=env, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((two / "run.json").read_text())
    assert summary["processes"] == 2 and summary["jobs"]["succeeded"] == NUM_JOBS
    ranks = {json.loads(path.with_suffix(".json").read_text())["process"] for path in image_paths(two)}
    assert ranks == {0, 1}
    # The processes shared the views out: together they drew every prompt's grid.
    assert len(list(two.glob("*/grid-*.png"))) == 3
    assert len(pixel_hashes(one)) == NUM_JOBS and pixel_hashes(two) == pixel_hashes(one)
