"""The training run: two stages, accelerate for devices, precision, accumulation and checkpoints.

One optimiser and one LR schedule cover both stages: each parameter group's learning rate is a function of
the global step (the stage's rate for that group, with the stage's warm-up; 0 when the stage does not
train it), so a checkpoint anywhere restores the exact schedule. The batch order, the noise, the σ and the
dropout of micro-batch m on process p come from (seed, m, p) alone (`BatchSchedule`, `_generator`), so a
run resumed from step N sees exactly what an uninterrupted run sees; a checkpoint also keeps the global
torch RNG states, optimiser and schedule. Beside it: `checkpoints` (writing, pruning and choosing
them) and `export` (the weights and recipe `squeeze gen` loads).
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from squeeze_cli import outputs, processes
from squeeze_cli.errors import EXIT_SIGINT, ManifestError, SqueezeError
from squeeze_cli.images import load_rgb
from squeeze_cli.train.checkpoints import (
    CHECKPOINTS,
    LOG_FILE,
    RUN_RECORD,
    CheckpointWriteError,
    RunError,
    RunLock,
    TrainState,
    checkpoint_dirs,
    checkpoint_to_resume,
    load_checkpoint,
    resume_hint,
    save_checkpoint,
    trim_log,
)
from squeeze_cli.train.config import LoadedConfig, StageSpec
from squeeze_cli.train.data import BatchSchedule, TrainData, fit_to_bucket
from squeeze_cli.train.export import (
    NULL_CONDITION_DEFINITION,
    export_weights,
    run_recipe_text,
    trained_recipe_text,
)
from squeeze_cli.train.objective import (
    PreparedSample,
    draw_dropout,
    loss_on_batch,
    noise_like_packed,
    sample_sigmas,
)

# accelerate's distributed types that shard parameters (DDP keeps a whole copy on every process).
SHARDED_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")


class TrainingInterrupted(SqueezeError):
    """Ctrl-C during training: the checkpoints written so far are kept for `--resume latest`."""

    exit_code = EXIT_SIGINT


def stage_of(step: int, stages: list[tuple[str, StageSpec]]) -> tuple[str, StageSpec, int]:
    """(stage name, spec, step within the stage) of global optimiser step `step` (0-based)."""
    for name, spec in stages:
        if step < spec.steps:
            return name, spec, step
        step -= spec.steps
    name, spec = stages[-1]
    return name, spec, spec.steps


def group_learning_rate(step: int, group: str, stages: list[tuple[str, StageSpec]]) -> float:
    """The learning rate of `group` at global step `step`: its stage's rate after a linear warm-up."""
    _, spec, within = stage_of(step, stages)
    if group not in spec.train:
        return 0.0
    warmup = min(1.0, (within + 1) / spec.warmup_steps) if spec.warmup_steps else 1.0
    return spec.learning_rates[group] * warmup


def _generator(seed: int, micro_step: int, process: int, purpose: int) -> torch.Generator:
    # Independent streams per (micro-step, process, purpose) from one seed: no RNG state to carry.
    return torch.Generator().manual_seed(hash((seed, micro_step, process, purpose)) & (2**63 - 1))


class Trainer:
    """One training run of a loaded config over validated data.

    Args:
        loaded: the validated config.
        data: the validated training data.
        resume: `"latest"` to continue from the newest checkpoint in the output folder (from scratch when
            there is none), a checkpoint folder, or None for a new run.
    """

    def __init__(self, loaded: LoadedConfig, data: TrainData, resume: str | None = None):
        self.loaded = loaded
        self.config = loaded.config
        self.data = data
        self.output_dir = loaded.output_dir
        self.resume = resume
        self.stages = [("stage1", self.config.stages.stage1), ("stage2", self.config.stages.stage2)]
        self.stages = [(n, s) for n, s in self.stages if s.steps > 0] or self.stages[:1]
        self.total_steps = sum(s.steps for _, s in self.stages)
        self.state = TrainState()

    # Setup ---------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        from squeeze_cli.manifest.recipes import load_recipe
        from squeeze_cli.pipelines.squeeze import SqueezePipeline
        from squeeze_cli.train import models as train_models

        training = self.config.training
        self.accelerator = Accelerator(
            cpu=processes.accelerate_cpu(),
            mixed_precision=training.mixed_precision,
            gradient_accumulation_steps=training.gradient_accumulation_steps,
            # Some parameters can sit out a step: a group the stage freezes, or the image LAP when every
            # sample of a micro-batch has its MLLM condition dropped (the null condition has no image).
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        if self.accelerator.distributed_type in SHARDED_TYPES:
            # Checkpoints, exports and gradient clipping read whole parameters; sharded ones would be
            # saved as shards, or not at all.
            raise RunError(
                f"squeeze train runs under DDP only, not {self.accelerator.distributed_type.value}",
                "accelerate launch --multi_gpu (no --use_fsdp, --use_deepspeed or a config that sets them)",
            )
        self.recipe = load_recipe(self.config.recipe, relative_to=self.loaded.recipe_base)
        self.weight_dtype = train_models.weight_dtype(training.mixed_precision)
        # The main process first: it fills the caches (hub downloads, the tiny checkpoint) the others read;
        # under torchrun, transformers' save_pretrained writes weights on rank 0 only, so a tiny checkpoint
        # built by another rank would lack them.
        with self.accelerator.main_process_first():
            base = train_models.load_base_models(self.recipe.model, self.weight_dtype)
        self.pipeline_source = base.pipeline_source
        parts = base.components
        for name in ("mllm", "vae"):  # frozen: never any gradient
            parts[name].requires_grad_(False).eval()
        transformer = parts["transformer"]
        transformer.requires_grad_(False)
        aggregator = train_models.build_trainable(self.loaded, parts["mllm"], transformer, self.config.seed)
        # Trained parameters in float32 (the new aggregator is built so; mixed precision computes in
        # bf16/fp16); frozen ones in weight_dtype.
        for name, param in transformer.named_parameters():
            if "lora_" in name:
                param.data = param.data.float()
        if training.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.trainable = train_models.TrainableModels(aggregator, transformer)
        self.groups = train_models.group_parameters(self.trainable)
        trained_anywhere = sorted({g for _, s in self.stages for g in s.train})
        train_models.set_trainable(self.trainable, trained_anywhere)

        device = self.accelerator.device
        parts["mllm"].to(device)
        parts["vae"].to(device)
        self.pipe = SqueezePipeline(aggregator=aggregator, **parts)
        self.pipe.set_progress_bar_config(disable=True)

        optimizer_spec = training.optimizer
        param_groups: list[dict[str, Any]] = [
            {"params": [p for _, p in self.groups[g]], "lr": 1.0, "name": g}
            for g in ("aggregator", "lora")
            if g in trained_anywhere
        ]
        self.group_names = [g["name"] for g in param_groups]
        optimizer = torch.optim.AdamW(
            param_groups,
            lr=1.0,
            betas=(optimizer_spec.beta1, optimizer_spec.beta2),
            eps=optimizer_spec.eps,
            weight_decay=optimizer_spec.weight_decay,
        )
        stages = self.stages

        def rate_of(group: str) -> Callable[[int], float]:
            return lambda step: group_learning_rate(step, group, stages)

        lambdas = [rate_of(g) for g in self.group_names]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        self.models, self.optimizer = self.accelerator.prepare(self.trainable, optimizer)
        self.null_encoding = self.pipe.mllm_encoder.encode_null()
        self.schedule = BatchSchedule(self.data, training.buckets, training.batch_size, self.config.seed)

    def check_fits(self) -> None:
        """Every sample's references + instruction fit the MLLM's context (from image headers, before the run
        writes anything); raises `ManifestError` naming each sample that does not."""
        if self.data.headers is None:
            return
        problems = []
        for index in range(len(self.data)):
            sizes, instruction, where = self.data.headers(index)
            try:
                self.pipe.mllm_encoder.check_fits(sizes, [instruction])
            except ValueError as error:
                problems.append(replace(where, message=str(error).splitlines()[0]))
        if problems:
            raise ManifestError(problems[:20])

    # Checkpoints ---------------------------------------------------------------------------------------

    def trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for params in self.groups.values() for name, p in params}

    def save_checkpoint(self) -> Path:
        """`checkpoints/step-N` of the current step (`checkpoints.save_checkpoint`)."""
        return save_checkpoint(
            self.accelerator,
            self.output_dir,
            self.state.step,
            self.config.checkpointing.keep,
            self.trainable_parameters(),
            self.optimizer,
            self.scheduler,
        )

    # Steps ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare_sample(
        self, index: int, bucket: tuple[int, int], with_references: bool = True
    ) -> PreparedSample:
        """The frozen models' view of sample `index`: MLLM encoding, target latents and, for stage 2
        (`with_references`), reference latents (stage 1 never uses them, so they are not encoded)."""
        sample = self.data.load(index)
        pipe = self.pipe
        device = self.accelerator.device
        cached = self._cached_latents(sample.id, bucket)
        target_latents, reference_latents = cached if cached is not None else (None, [])
        complete = cached is not None and (bool(reference_latents) or not with_references)
        if target_latents is None:
            target = fit_to_bucket(sample.target, bucket)
            pixels = pipe.vae_image_processor.preprocess(target, height=bucket[1], width=bucket[0])
            target_latents = pipe._encode_vae_image(pixels.to(device=device, dtype=pipe.vae.dtype))[0]
        if with_references and not reference_latents:
            reference_latents = pipe.encode_references(
                sample.references, self.config.training.reference_size, device=device
            )
        if not complete:  # a stage-1 entry gains its references in stage 2
            self._store_latents(sample.id, bucket, target_latents, reference_latents)
        encoding = pipe.mllm_encoder.encode(sample.references, sample.instruction)
        return PreparedSample(
            sample.id, encoding, target_latents, reference_latents if with_references else []
        )

    def _cache_path(self, sample_id: str, bucket: tuple[int, int]) -> Path:
        import hashlib

        from squeeze_cli.manifest.recipes import model_identity

        # The sample id (never a step index), plus everything else that changes the latents.
        size = self.config.training.reference_size
        key = f"{sample_id}\0{bucket[0]}x{bucket[1]}\0{size}\0{model_identity(self.recipe.model)}"
        return (
            self.output_dir
            / "cache"
            / "latents"
            / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"
        )

    def _cached_latents(self, sample_id: str, bucket: tuple[int, int]):
        if not self.config.training.cache_latents:
            return None
        path = self._cache_path(sample_id, bucket)
        if not path.is_file():
            return None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path), device=str(self.accelerator.device))
            references = [tensors[f"reference_{i}"] for i in range(len(tensors) - 1)]
            return tensors["target"], references
        except (SafetensorError, OSError, KeyError):  # a damaged entry is a miss: encoded and stored again
            return None

    def _store_latents(self, sample_id, bucket, target, references) -> None:
        if not self.config.training.cache_latents:
            return
        from safetensors.torch import save

        tensors = {"target": target.cpu().contiguous()}
        tensors.update({f"reference_{i}": r.cpu().contiguous() for i, r in enumerate(references)})
        outputs.atomic_write_bytes(
            self._cache_path(sample_id, bucket), save(tensors, metadata={"sample_id": sample_id})
        )

    def micro_step(self, micro: int) -> tuple[torch.Tensor, int]:
        """Loss of micro-batch `micro` on this process, and how many samples it held."""
        accelerator = self.accelerator
        process = accelerator.process_index
        indices, bucket = self.schedule.batch(micro * accelerator.num_processes + process)
        stage_name, _, _ = stage_of(self.state.step, self.stages)
        samples = [self.prepare_sample(i, bucket, with_references=stage_name == "stage2") for i in indices]
        training = self.config.training
        dropout_spec = training.dropout
        drops = draw_dropout(len(samples), dropout_spec, _generator(self.config.seed, micro, process, 0))
        num_tokens = (bucket[0] // 16) * (bucket[1] // 16)
        sigmas = sample_sigmas(
            len(samples),
            training.timesteps,
            num_tokens,
            _generator(self.config.seed, micro, process, 1),
            self.pipe.scheduler.config,
        )
        noise_generator = _generator(self.config.seed, micro, process, 2)
        noise = [noise_like_packed(s.target_latents, noise_generator) for s in samples]

        def compute(models):
            return loss_on_batch(
                self.pipe,
                models,
                samples,
                drops,
                sigmas,
                noise,
                self.null_encoding,
                use_references=stage_name == "stage2",
                guidance=training.guidance,
            )

        with accelerator.autocast():
            loss = self.models(compute)
        return loss, len(samples)

    # Outputs -------------------------------------------------------------------------------------------

    def export(self, folder: Path, stage_name: str) -> Path:
        """The current weights and a recipe for them in `folder` (`export.export_weights`)."""
        transformer = self.accelerator.unwrap_model(self.models).transformer
        text = trained_recipe_text(self.recipe, self.pipeline_source, self.output_dir, folder, stage_name)
        return export_weights(folder, self.trainable.aggregator, transformer, text)

    def validate_images(self, stage_name: str) -> Path | None:
        """Render the config's validation prompts with the current weights through a fresh `SqueezePipeline`
        (fresh, so its cached null condition is the current aggregator's) into a labelled grid."""
        from squeeze_cli.pipelines.squeeze import SqueezePipeline

        validation = self.config.validation
        if not validation.prompts or not self.accelerator.is_main_process:
            return None
        unwrapped = self.accelerator.unwrap_model(self.models)
        pipe = SqueezePipeline(
            mllm=self.pipe.mllm,
            tokenizer=self.pipe.tokenizer,
            image_processor=self.pipe.image_processor,
            aggregator=unwrapped.aggregator,
            transformer=unwrapped.transformer,
            vae=self.pipe.vae,
            scheduler=self.pipe.scheduler,
        )
        pipe.set_progress_bar_config(disable=True)
        thresholds = (0.0, 0.0) if stage_name == "stage1" else tuple(validation.stage_thresholds)
        unwrapped.eval()
        rows = []
        try:
            for prompt, paths in zip(validation.prompts, self.loaded.validation_references, strict=True):
                references = [load_rgb(p) for p in paths]
                with self.accelerator.autocast():
                    image = pipe(
                        prompt.instruction,
                        references,
                        height=validation.size[1],
                        width=validation.size[0],
                        num_inference_steps=validation.steps,
                        guidance_scale=validation.guidance_scale,
                        stage_thresholds=thresholds,
                        reference_size=self.config.training.reference_size,
                        generator=torch.Generator().manual_seed(validation.seed),
                    ).images[0]
                rows.append((references, prompt.instruction, image))
        finally:
            unwrapped.train()
        path = self.output_dir / "validation" / f"step-{self.state.step:07d}.png"
        return outputs.write_validation_grid(path, f"step {self.state.step} ({stage_name})", rows)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        # As the run index is appended: one whole line a write, never through a link or blocking on a FIFO
        # (`check_log_file` refused those before the run; this catches one put there since).
        outputs.append_line(self.output_dir / LOG_FILE, (json.dumps(record) + "\n").encode("utf-8"))
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def _trim_log(self) -> None:
        """At the start, drop log lines past the step the run starts from: those steps are run again."""
        if self.accelerator.is_main_process:
            trim_log(self.output_dir, self.state.step)

    def summary(self) -> dict[str, Any]:
        """What trains in each stage (recorded as training.json)."""
        from squeeze_cli.train.models import count

        return {
            "config": str(self.loaded.path),
            "recipe": self.recipe.source,
            "total_steps": self.total_steps,
            "stages": {
                name: {
                    "steps": spec.steps,
                    "reference_tokens": name == "stage2",
                    "trains": list(spec.train),
                    "learning_rates": {g: spec.learning_rates[g] for g in spec.train},
                    "trainable_parameters": {g: count(self.groups[g]) for g in spec.train},
                    "frozen": ["mllm", "vae", "transformer base weights"]
                    + [g for g in ("aggregator", "lora") if g not in spec.train],
                }
                for name, spec in self.stages
            },
            "null_condition": NULL_CONDITION_DEFINITION,
            "data": self.data.description,
            "processes": self.accelerator.num_processes,
        }

    # Run -----------------------------------------------------------------------------------------------

    def run(self, progress: bool = True) -> Path | None:
        """Train both stages (or what is left of them) and export; returns the run's recipe file (on the
        main process; None on the others).

        Raises:
            `CheckpointWriteError`: a file of the run could not be written (a full disk): the hint says to
                continue with `--resume latest` (the same command again is refused: the folder holds a run).
        """
        self.lock = RunLock(self.output_dir)
        try:
            return self._run(progress)
        except outputs.OutputWriteError as error:  # a grid, an export, the log, the record, a cached latent
            raise CheckpointWriteError(error.message, resume_hint(self.output_dir, error.fix)) from None
        finally:
            self.lock.release()

    def _run(self, progress: bool) -> Path | None:
        from squeeze_cli.logs import log_line, progress_bar

        checkpoint_to_resume(self.output_dir, self.resume)  # refused before any model loads
        self._setup()
        self.check_fits()
        accelerator = self.accelerator

        def lock() -> None:
            if not accelerator.is_main_process:
                return
            try:
                self.lock.acquire()
            except outputs.OutputWriteError as error:  # nothing written yet: no run to resume
                raise RunError(
                    error.message, "set `output_dir` to a folder this user can write, on a disk with space"
                ) from None

        # One run per output folder (two would log every step twice and save over each other's checkpoints),
        # and the folder looked at again under the lock: another run may have written it since. Every
        # process has looked before the main one writes: a record written earlier would refuse it. A
        # refusal on any process ends every process (`processes.together`): none waits at a barrier.
        place = (accelerator.process_index, accelerator.num_processes)
        processes.together(lock, *place)
        start = processes.together(lambda: checkpoint_to_resume(self.output_dir, self.resume), *place)
        if accelerator.is_main_process:
            outputs.atomic_write_json(self.output_dir / RUN_RECORD, self.summary())  # first: the marker
            outputs.atomic_write_text(self.output_dir / "config.yaml", self.loaded.text)
        if accelerator.is_main_process:  # what a killed save or export left behind is never used
            for folder in (self.output_dir, self.output_dir / CHECKPOINTS):
                for stale in folder.glob(".partial-*") if folder.is_dir() else []:
                    shutil.rmtree(stale, ignore_errors=True)
            for folder, problem in start.skipped:
                log_line(f"skipping the damaged checkpoint {folder}: {problem}", sys.stdout)
        if start.checkpoint is not None:
            self.state.step = load_checkpoint(
                start.checkpoint, accelerator, self.trainable_parameters(), self.optimizer, self.scheduler
            )
            log_line(f"resumed from {start.checkpoint} at step {self.state.step}", sys.stdout)
        elif self.resume == "latest":
            log_line("no checkpoint to resume from: starting a new run", sys.stdout)
        self._trim_log()  # the steps after the checkpoint (all of them, without one) are run again
        self.tensorboard = None
        if self.config.logging.tensorboard and accelerator.is_main_process:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.output_dir / "tensorboard"))

        from squeeze_cli.train.models import set_trainable

        accumulation = self.config.training.gradient_accumulation_steps
        self.models.train()
        bar = progress_bar(
            self.total_steps,
            "train",
            unit="step",
            initial=self.state.step,
            enabled=progress and accelerator.is_main_process,
        )
        window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
        current_stage = None
        # Ctrl-C stops at a step boundary with a resume hint, also when the parent handed down SIGINT
        # ignored (a script's background job; `gen` takes its signals the same way).
        previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while self.state.step < self.total_steps:
                stage_name, spec, _ = stage_of(self.state.step, self.stages)
                if stage_name != current_stage:
                    set_trainable(self.trainable, spec.train)
                    current_stage = stage_name
                losses, step_samples, step_start = [], 0, time.perf_counter()
                for accumulated in range(accumulation):
                    micro = self.state.step * accumulation + accumulated
                    with accelerator.accumulate(self.models):
                        loss, batch = self.micro_step(micro)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients and self.config.training.optimizer.max_grad_norm:
                            trained = [p for g in spec.train for _, p in self.groups[g]]
                            accelerator.clip_grad_norm_(trained, self.config.training.optimizer.max_grad_norm)
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                    # The mean over processes, so the log is the run's loss, not one process's.
                    losses.append(accelerator.gather(loss.detach()[None]).float().mean().item())
                    step_samples += batch * accelerator.num_processes
                window_samples += step_samples
                # The rates this step used, read before the schedule moves to the next step.
                lrs = {
                    f"lr_{g}": group["lr"]
                    for g, group in zip(self.group_names, self.optimizer.param_groups, strict=True)
                }
                self.scheduler.step()
                self.state.step += 1
                step_loss = sum(losses) / len(losses)
                window_loss, window_steps = window_loss + step_loss, window_steps + 1
                if self.state.step % self.config.logging.every == 0 or self.state.step == self.total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record = {
                        "step": self.state.step,
                        "stage": stage_name,
                        "loss": window_loss / window_steps,
                        **lrs,
                        "samples_per_s": window_samples / elapsed,
                    }
                    self._log(record)
                    window_loss, window_steps, window_samples, window_start = 0.0, 0, 0, time.perf_counter()
                samples_per_s = step_samples / max(time.perf_counter() - step_start, 1e-9)
                bar.set_postfix(
                    stage=stage_name[-1],
                    loss=f"{step_loss:.4f}",
                    lr=f"{max(lrs.values()):.2e}",
                    samples_s=f"{samples_per_s:.2f}",
                    refresh=False,
                )
                bar.update()

                stage_done = (
                    stage_of(self.state.step - 1, self.stages)[0] != stage_of(self.state.step, self.stages)[0]
                    or self.state.step == self.total_steps
                )
                every = self.config.validation.every
                if stage_done or (every and self.state.step % every == 0):
                    self.validate_images(stage_name)
                if stage_done and accelerator.is_main_process:
                    self.export(self.output_dir / stage_name, stage_name)
                if (
                    self.state.step % self.config.checkpointing.every == 0
                    or self.state.step == self.total_steps
                ):
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            saved = checkpoint_dirs(self.output_dir)
            where = f"from {saved[-1].name}" if saved else "from the start (no checkpoint yet)"
            raise TrainingInterrupted(
                f"stopped by SIGINT at step {self.state.step}",
                f"continue with `--resume latest`, {where}",
            ) from None
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            if self.tensorboard is not None:  # its queued events written, however the loop ends
                self.tensorboard.close()
        bar.close()
        final_stage = self.stages[-1][0]
        if accelerator.is_main_process:
            if not (self.output_dir / final_stage).is_dir():  # resumed after everything was trained
                self.export(self.output_dir / final_stage, final_stage)
            text = run_recipe_text(self.recipe, self.pipeline_source, self.output_dir, final_stage)
            outputs.atomic_write_text(self.output_dir / "recipe.yaml", text)
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return self.output_dir / "recipe.yaml" if accelerator.is_main_process else None
