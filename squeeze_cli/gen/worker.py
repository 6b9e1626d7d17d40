"""One process's share of `squeeze gen`: load the pipeline, walk its jobs subject by subject, batch, record.

`GenRun` (gen/runner.py) owns the run: locks, resume, the run files and the other processes. A `Worker`
owns the pipeline, through the contract in `squeeze_cli.pipelines.contract`: it encodes each subject once,
encodes the next prompts together, generates each batch with one CPU generator per image, writes each
image as soon as it is made and records every failure.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze_cli import outputs
from squeeze_cli.errors import Problem, describe_exception
from squeeze_cli.gen.progress import Reporter
from squeeze_cli.gen.signals import StopSignal
from squeeze_cli.images import load_rgb, upright_size
from squeeze_cli.manifest import LoadedManifest
from squeeze_cli.pipelines.registry import pipeline_spec
from squeeze_cli.plan import Job
from squeeze_cli.processes import Processes, ThreadChoice

if TYPE_CHECKING:
    from squeeze_cli.pipelines.contract import SubjectPipeline


@dataclass
class GenOptions:
    """The `squeeze gen` flags that are not manifest values (those went in through `--set`)."""

    out: Path | None = None
    overwrite: bool = False
    prune: bool = False  # move every stale image (a job the plan does not have) to OUT/.stale/<UTC time>/
    shard: tuple[int, int] | None = None  # (index, count), 0-based
    only: tuple[str, ...] = ()  # subject name globs (`--only`): a slice of the plan
    limit: int | None = None  # the first N subjects (`--limit`), after `only`
    batch_size: int = 1
    device: str = "auto"
    offload: str = "none"
    dry_run: bool = False
    allow_pickle: bool = False
    verify: bool = False  # hash every finished PNG, even those whose stat matches their sidecar's
    threads: int | None = None  # torch's threads (`--threads`); None: `processes.choose_threads` picks
    command: list[str] = field(default_factory=list)

    @property
    def part_of_the_plan(self) -> bool:
        """Whether this run makes only part of the plan's images (a shard, a slice, or both)."""
        return self.shard is not None or bool(self.only) or self.limit is not None


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


# How many distinct prompts of a subject are encoded ahead of their batches, together: enough to make model
# offload move the MLLM once per many batches, few enough that their conditions take little memory (an
# InternVL3 condition of three references is ~6 MiB in bf16).
PROMPTS_AHEAD = 16


def _batches(jobs: Sequence[Job], batch_size: int) -> Iterator[list[Job]]:
    """Consecutive jobs of one subject with equal sampling parameters, at most `batch_size` at a time."""
    for _, group in groupby(jobs, key=lambda job: (job.subject_index, job.params)):
        same_params = list(group)
        # First Block Cache decides for a whole batch whether to skip a step, so such images go one at a
        # time to stay independent of their batch.
        step_cache = same_params[0].params.step_cache
        size = 1 if step_cache is not None and step_cache.decides_per_batch else batch_size
        for start in range(0, len(same_params), size):
            yield same_params[start : start + size]


class Worker:
    """Generates the pending jobs of one process and records every outcome."""

    pipe: SubjectPipeline  # set by `load`, which a process with no jobs never calls

    def __init__(
        self,
        manifest: LoadedManifest,
        options: GenOptions,
        reporter: Reporter,
        out_dir: Path,
        run_dir: Path,
        processes: Processes,
    ):
        self.manifest = manifest
        self.options = options
        self.reporter = reporter
        self.out_dir = out_dir
        self.run_dir = run_dir
        self.processes = processes
        self.pipeline_info: dict[str, Any] = {}  # set by `load`: name, class, sampling_parameters
        self.threads: ThreadChoice | None = None  # set by `load`
        self.gate: Any = None  # the identity gate (squeeze_cli/gen/gate.py), when the manifest has `quality`
        self.succeeded: list[str] = []
        self.failures: list[dict[str, Any]] = []
        self.timings = {"load": 0.0, "encode_subjects": 0.0, "generate": 0.0}
        # Over the images made with a step cache: transformer passes, and those the cache skipped (run.json).
        self.step_cache = {"images": 0, "transformer_passes": 0, "skipped": 0}
        self.preset_name = manifest.recipe.name if manifest.recipe is not None else "custom"
        self.model_info = manifest.model.model_dump(mode="json")
        self.license = manifest.license.model_dump(mode="json")
        self.versions = outputs.package_versions()

    @property
    def model_record(self) -> dict[str, Any]:
        """What `run.json` says about the model: the preset's name and licence, the model section, package
        versions."""
        return {
            "preset": self.preset_name,
            "license": self.license,
            "model": self.model_info,
            "versions": self.versions,
        }

    def load(self) -> None:
        from squeeze_cli.loading import load_pipeline

        started = time.perf_counter()
        self.threads = self.processes.set_threads(self.options.threads)
        device = self.processes.device(self.options.device)
        self.reporter.status(f"loading {self.preset_name} on {device} ({self.manifest.model.dtype})")
        self.pipe = load_pipeline(
            self.manifest.model,
            device=device,
            offload=self.options.offload,
            allow_pickle=self.options.allow_pickle,
        )
        if self.manifest.document.quality is not None:
            from squeeze_cli.gen.gate import IdentityGate

            self.gate = IdentityGate(self.manifest.document.quality, self.preset_name, device)
        if self.pipe.lora_fused:  # recorded in every sidecar's `model`
            self.model_info["lora"] = {**self.model_info["lora"], "fused": True}
        self.timings["load"] = time.perf_counter() - started
        registered = pipeline_spec(self.manifest.model.pipeline_class)
        self.pipeline_info = {
            "name": registered.name,
            "class": type(self.pipe).__name__,
            "distilled_guidance": registered.distilled_guidance,
            "sampling_parameters": self.pipe.sampling_parameters,
            "reference_sizing": registered.reference_sizing,
        }

    def build_tiny_models(self) -> None:
        """Build the tiny random checkpoints this run uses (the model, the gate's metric model) into the
        cache, where `load` then finds them."""
        if self.manifest.model.builtin:
            from squeeze_cli.loading import builtin_checkpoint

            builtin_checkpoint(self.manifest.model)
        if self.manifest.document.quality is not None:
            from squeeze_cli.gen.gate import IdentityGate

            IdentityGate.dino_spec(self.manifest.document.quality, self.preset_name)

    def check_instructions(self, jobs: Sequence[Job]) -> list[Problem]:
        """One problem per prompt too long for the MLLM's context with its subject's references.

        Reads only the references' headers, so a manifest of thousands of subjects is checked quickly."""
        problems: list[Problem] = []
        for _, group in groupby(jobs, key=lambda job: job.subject_index):
            subject_jobs = list(group)
            try:
                sizes = [upright_size(path) for path in subject_jobs[0].references]
            except Exception as error:  # changed since validation: e.g. swapped for a FIFO, or deleted
                field = f"subjects[{subject_jobs[0].subject_index}].references"
                reason = f"a reference cannot be read any more: {describe_exception(error)}"
                problems.append(Problem(str(self.manifest.path), None, None, field, reason))
                continue
            prompts = {(job.prompt_index, job.prompt) for job in subject_jobs}
            for prompt_index, prompt in sorted(prompts):
                try:
                    self.pipe.check_prompt_fits(sizes, [prompt])
                except ValueError as error:
                    subject_index = subject_jobs[0].subject_index
                    where = self.manifest.subjects[subject_index].prompts[prompt_index].location
                    assert where is not None  # the resolver records every prompt's location
                    field = f"subjects[{subject_index}].prompts[{prompt_index}]"
                    problems.append(Problem(where.file, where.line, where.column, field, str(error)))
        return problems

    def run(self, jobs: Sequence[Job], stop: StopSignal) -> None:
        for _, group in groupby(jobs, key=lambda job: job.subject_index):
            subject_jobs = list(group)
            if stop.signum is not None:
                return
            conditions = self._encode_subject(subject_jobs)
            if conditions is None:
                continue
            batches = list(_batches(subject_jobs, self.options.batch_size))
            prepared = 0  # batches[:prepared] have their prompts encoded
            for number, batch in enumerate(batches):
                if stop.signum is not None:
                    return
                if number == prepared:
                    prepared = self._prepare_prompts(batches, number, conditions)
                self._generate(batch, conditions[batch[0].params.reference_size])

    def _encode_subject(self, jobs: list[Job]) -> dict[int, Any] | None:
        """The subject's condition for each reference size its jobs use; None when its references fail."""
        started = time.perf_counter()
        try:
            images = [load_rgb(path) for path in jobs[0].references]
            conditions = {
                size: self.pipe.encode_subject(images, reference_size=size)
                for size in sorted({job.params.reference_size for job in jobs})
            }
        except Exception as error:  # a reference unreadable since validation, or the model failing on it
            for job in jobs:
                self._fail(job, f"cannot encode the subject's references: {describe_exception(error)}")
            return None
        self.timings["encode_subjects"] += time.perf_counter() - started
        return conditions

    def _prepare_prompts(self, batches: list[list[Job]], start: int, conditions: dict[int, Any]) -> int:
        """Encode the prompts of `batches[start:end]` (at most `PROMPTS_AHEAD` distinct ones) before they
        run, so the MLLM runs for them together (with model offload: one move onto the GPU, not one per
        batch); returns `end`. Encoding failures are left to each batch's own call, which reports them."""
        end, prompts = start, set[str]()
        while end < len(batches) and len(prompts | {job.prompt for job in batches[end]}) <= PROMPTS_AHEAD:
            prompts |= {job.prompt for job in batches[end]}
            end += 1
        end = max(end, start + 1)
        started = time.perf_counter()
        by_size: dict[int, list[str]] = {}
        for batch in batches[start:end]:
            texts = by_size.setdefault(batch[0].params.reference_size, [])
            texts.extend(job.prompt for job in batch)
            # True CFG encodes the negative prompt too: with the others, not inside the batch's call.
            params = batch[0].params
            if params.true_cfg_scale > 1 and params.negative_prompt is not None:
                if "negative_prompt" in self.pipeline_info["sampling_parameters"]:
                    texts.append(params.negative_prompt)
        for size, size_prompts in by_size.items():
            try:
                self.pipe.prepare_prompts(conditions[size], size_prompts)
            except Exception:  # noqa: BLE001 - the batch's own `pipe(...)` encodes again and reports the error
                break
        self.timings["encode_subjects"] += time.perf_counter() - started
        return end

    def _generate(self, batch: list[Job], condition: Any) -> None:
        import torch

        self.reporter.batch_started(batch, batch[0].params.num_inference_steps)
        started = time.perf_counter()
        try:
            kwargs = self._sampling_kwargs(batch[0])
            result = self.pipe(
                prompt=[job.prompt for job in batch],
                subject_condition=condition,
                # Each image's noise from its own seed: the same image whatever batch it lands in.
                generator=[torch.Generator("cpu").manual_seed(job.seed) for job in batch],
                callback_on_step_end=self._on_step,
                **kwargs,
            )
        except Exception as error:
            self.reporter.batch_finished()
            if _is_out_of_memory(error) and len(batch) > 1:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                half = len(batch) // 2
                self.reporter.warning(
                    f"out of memory with a batch of {len(batch)}; retrying as {half} + {len(batch) - half}"
                )
                self._generate(batch[:half], condition)
                self._generate(batch[half:], condition)
                return
            for job in batch:
                self._fail(job, describe_exception(error))
            return
        self.reporter.batch_finished()
        passes = self.pipe.step_cache_passes  # this call's, per image: a remake by the gate makes its own
        images, qualities = result.images, [None] * len(batch)
        if self.gate is not None:
            images, qualities = self.gate.apply(
                batch, images, lambda jobs, seeds: self._remake(jobs, seeds, condition)
            )
        seconds = time.perf_counter() - started
        self.timings["generate"] += seconds
        plan = result.stage_plan.to_dict() if result.stage_plan is not None else None
        for job, image, quality in zip(batch, images, qualities, strict=True):
            record = outputs.image_record(
                job,
                preset_name=self.preset_name,
                model_info=self.model_info,
                stage_plan=plan,
                timings={"total": seconds / len(batch), "batch": seconds, "batch_size": len(batch)},
                versions=self.versions,
                pipeline=self.pipeline_info,
                license=self.license,
            )
            record["process"] = self.processes.index
            if passes is not None:
                full, calls = passes
                record["step_cache_passes"] = {"transformer_passes": calls, "skipped": calls - full}
                if job.params.step_cache is not None and job.params.step_cache.skip is not None:
                    record["step_cache_passes"]["calibrated_threshold"] = kwargs["step_cache"].threshold
                self.step_cache["images"] += 1
                self.step_cache["transformer_passes"] += calls
                self.step_cache["skipped"] += calls - full
            if quality is not None:
                record["quality"] = quality
            outputs.save_image(self.out_dir, job, image, record, self.manifest.document.output.metadata)
            # Finished from here on (the sidecar is the marker), whatever happens to its index line: a
            # line that cannot be written is added by the repair at the start of the next run.
            self.succeeded.append(job.job_id)
            self.reporter.job_finished(job, record["files"]["image"], seconds / len(batch))
            if self.processes.is_main:
                outputs.append_index(self.run_dir, outputs.index_entry(record))

    def _sampling_kwargs(self, job: Job) -> dict[str, Any]:
        """The job's sampling parameters that the loaded pipeline reads (validation refused the others)."""
        used = self.pipeline_info["sampling_parameters"]
        kwargs = {key: value for key, value in job.params.to_pipeline_kwargs().items() if key in used}
        step_cache = kwargs.get("step_cache")
        if step_cache is not None and step_cache.skip is not None:
            threshold = self._calibrated_threshold(job, kwargs)
            kwargs["step_cache"] = replace(step_cache, skip=None, threshold=threshold)
        return kwargs

    def _calibrated_threshold(self, job: Job, kwargs: dict[str, Any]) -> float:
        """The threshold of a `skip` target for this model and these sampling settings: calibrated with a
        probe image once, then kept in squeeze's cache folder for every later run (and process)."""
        from squeeze_cli.loading import cache_dir

        settings = {key: value for key, value in job.params.to_dict().items() if key in kwargs}
        key = json.dumps({"model": self.manifest.model_identity, **settings}, sort_keys=True)
        path = cache_dir() / "step-cache-calibrations.json"
        try:
            known = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            known = {}
        if key not in known:
            self.reporter.status(
                f"calibrating step_cache skip={kwargs['step_cache'].skip} with a probe image"
            )
            probe_kwargs = {name: value for name, value in kwargs.items() if name != "step_cache"}
            known[key] = self.pipe.calibrate_step_cache(kwargs["step_cache"], **probe_kwargs)
            path.parent.mkdir(parents=True, exist_ok=True)
            outputs.atomic_write_text(path, json.dumps(known, indent=1, sort_keys=True))
        return known[key]

    def _remake(self, jobs: list[Job], seeds: list[int], condition: Any) -> list[Any]:
        """The identity gate's next attempt: the same jobs with other seeds, in one batch."""
        import torch

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
        kwargs = self._sampling_kwargs(jobs[0])
        return self.pipe(
            prompt=[job.prompt for job in jobs], subject_condition=condition, generator=generators, **kwargs
        ).images

    def _on_step(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        self.reporter.step()
        return callback_kwargs

    def _fail(self, job: Job, error: str) -> None:
        failure = {
            "job_id": job.job_id,
            "subject": job.subject,
            "prompt_index": job.prompt_index,
            "seed": job.seed,
            "error": error,
        }
        self.failures.append(failure)
        if self.processes.is_main:
            outputs.append_index(self.run_dir, outputs.failed_index_entry(job, error))
        self.reporter.job_failed(job, error)
