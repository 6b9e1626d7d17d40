"""What a resolved manifest is: `LoadedManifest` (with its subjects and prompts), all the planner needs,
and how it writes itself back as `manifest.resolved.yaml`. `resolve.py` makes one from the file."""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from squeeze_cli.errors import Problem
from squeeze_cli.manifest.located import Location
from squeeze_cli.manifest.recipes import UNKNOWN_LICENSE, License, Recipe
from squeeze_cli.manifest.reference_facts import ReferenceFacts
from squeeze_cli.manifest.schema import MANIFEST_VERSION, Manifest, ModelSpec
from squeeze_cli.params import SamplingParams
from squeeze_cli.pipelines.registry import pipeline_spec

# The header line of `manifest.resolved.yaml` that records `LoadedManifest.resolved_fingerprint`.
RESOLVED_FINGERPRINT_PREFIX = "# fingerprint: "


@dataclass(frozen=True)
class ResolvedPrompt:
    index: int
    template: str  # as written, placeholders included
    text: str  # placeholders substituted
    params: SamplingParams
    seeds: Sequence[int]  # a tuple, or a range for {count, base}
    location: Location | None = None  # where the prompt is written, for problems found after loading
    sweep: tuple[tuple[str, Any], ...] = ()  # (key, value) of each swept key: one value of a list

    @property
    def sweep_label(self) -> str:
        """What tells this prompt's sweep values apart in grids, short enough for a caption: ``steps=4
        guidance=2.5 τ=0.9,0.8``; empty without a sweep."""
        return " ".join(
            f"{SWEEP_LABELS[key]}={','.join(map(str, value)) if isinstance(value, tuple) else value}"
            for key, value in self.sweep
        )


# How a grid's caption names each swept key (`schema.SWEPT_KEYS`).
SWEEP_LABELS = {
    "num_inference_steps": "steps",
    "guidance_scale": "guidance",
    "true_cfg_scale": "true_cfg",
    "stage_thresholds": "τ",
}


@dataclass(frozen=True)
class ResolvedSubject:
    index: int
    name: str
    class_noun: str | None
    references: tuple[str, ...]  # absolute paths, sorted, deduplicated
    prompts: tuple[ResolvedPrompt, ...]


@dataclass(frozen=True)
class LoadedManifest:
    """A validated manifest with its recipe merged in and its references found: all the planner needs."""

    path: Path
    document: Manifest  # the top level as written (its `subjects` empty: they are `subjects` below)
    recipe: Recipe | None
    model: ModelSpec
    model_identity: str
    output_dir: Path
    max_jobs: int
    subjects: tuple[ResolvedSubject, ...]
    # Valid but probably not what was meant (e.g. a negative prompt that true CFG does not use): each is
    # printed as `warning: FILE:LINE: ... (hint: ...)` by `validate` and `gen`, and does not stop them.
    warnings: tuple[Problem, ...] = ()
    # The references' checks and digests, read once (or trusted from the output folder's cache).
    reference_facts: ReferenceFacts = field(default_factory=ReferenceFacts, compare=False, repr=False)

    @property
    def license(self) -> License:
        """The licence of the weights: the recipe's; unknown for a manifest's own `model:`."""
        return self.recipe.license if self.recipe is not None else UNKNOWN_LICENSE

    @property
    def num_jobs(self) -> int:
        return count_jobs(self.subjects)

    def resolved_dict(self) -> dict[str, Any]:
        """A self-contained manifest that plans the same jobs: every path absolute, every value explicit.

        Written as ``manifest.resolved.yaml`` next to the outputs, so a run can be reproduced from it. Only
        the sampling keys the model's pipeline reads are written (validation refuses the others; left out,
        they keep their defaults, so the job ids are the same).
        """
        written = self._written_params()
        return {**self._resolved_head(), "subjects": [_resolved_subject(s, written) for s in self.subjects]}

    def _resolved_head(self) -> dict[str, Any]:
        return {
            "version": MANIFEST_VERSION,
            **({"recipe": self.recipe.source} if self.recipe is not None else {}),
            "model": self.model.model_dump(mode="json"),
            "output": {**self.document.output.model_dump(mode="json"), "dir": str(self.output_dir)},
            "max_jobs": self.max_jobs,
            **({"quality": self.document.quality.model_dump(mode="json")} if self.document.quality else {}),
            **(
                {"acknowledge_license": self.document.acknowledge_license}
                if self.document.acknowledge_license
                else {}
            ),
        }

    def _written_params(self) -> Callable[[SamplingParams], dict[str, Any]]:
        """`params -> the sampling keys written for them`, each distinct set of parameters worked out once."""
        used = pipeline_spec(self.model.pipeline_class).sampling_parameters
        written: dict[SamplingParams, dict[str, Any]] = {}

        def write(params: SamplingParams) -> dict[str, Any]:
            if params not in written:
                written[params] = {k: v for k, v in params.to_dict().items() if k in used}
            return written[params]

        return write

    def resolved_fingerprint(self, shard: tuple[int, int] | None = None) -> str:
        """A hash of what `resolved_yaml` writes, recorded in its header: a rerun whose file already has it
        skips the YAML (libyaml takes most of a no-op rerun at 100,000 jobs; this takes a second). Hashed
        subject by subject, so that the whole document is never held at once."""

        def encoded(value: Any) -> bytes:
            return json.dumps(value, sort_keys=True, default=str).encode()

        hasher = hashlib.sha256(encoded([shard, self._resolved_head()]))
        written = self._written_params()
        for subject in self.subjects:
            hasher.update(encoded(_resolved_subject(subject, written)))
        return hasher.hexdigest()

    def resolved_yaml(self, shard: tuple[int, int] | None = None) -> str:
        """`resolved_dict` as YAML; a shard's copy says which part of the plan it ran (a comment: the
        file stays a manifest that plans every job)."""
        header = "# Written by squeeze: the manifest as it was run, every value explicit.\n"
        header += f"{RESOLVED_FINGERPRINT_PREFIX}{self.resolved_fingerprint(shard)}\n"
        if shard is not None:
            header += (
                f"# This is shard {shard[0]}/{shard[1]} (--shard {shard[0]}/{shard[1]}): it ran part "
                f"{shard[0]} (0-based) of the {shard[1]} parts of this plan.\n"
            )
        # Subject by subject: libyaml's dump of the whole document at once held 1.2 GB at 100,000 jobs.
        written = self._written_params()
        subjects = "".join(_yaml([_resolved_subject(s, written)]) for s in self.subjects)
        return (
            header
            + _yaml(self._resolved_head())
            + ("subjects:\n" + subjects if subjects else "subjects: []\n")
        )


@functools.cache
def _dumper(base: type) -> type:
    """`base` writing a value that several prompts share in full each time, never as a YAML alias."""
    return type("ResolvedDumper", (base,), {"ignore_aliases": lambda self, data: True})


def _yaml(value: Any) -> str:
    # libyaml's dumper when PyYAML has it: several times faster than pure Python, same text.
    dumper = _dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    return yaml.dump(
        value, Dumper=dumper, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=None
    )


def _resolved_subject(
    subject: ResolvedSubject, written: Callable[[SamplingParams], dict[str, Any]]
) -> dict[str, Any]:
    """A subject of `LoadedManifest.resolved_dict`."""
    return {
        "name": subject.name,
        **({"class": subject.class_noun} if subject.class_noun is not None else {}),
        "references": list(subject.references),
        "prompts": [
            {
                "text": prompt.template,
                **written(prompt.params),
                # a swept value as a sweep of one: the same job, still labelled in grids
                **{key: [prompt.params.to_dict()[key]] for key, _ in prompt.sweep},
                "seeds": _seeds_to_yaml(prompt.seeds),
            }
            for prompt in subject.prompts
        ],
    }


def count_jobs(subjects: Iterable[ResolvedSubject]) -> int:
    """Number of jobs without building them (seed ranges are never expanded here)."""
    return sum(len(prompt.seeds) for subject in subjects for prompt in subject.prompts)


def too_many_jobs(total: int, limit: int) -> tuple[str, str]:
    """The message and hint of a plan over the job limit."""
    return (
        f"the manifest plans {total:,} jobs, more than the limit of {limit:,}",
        "raise it with `--max-jobs N` or `max_jobs: N` if that many images is intended",
    )


def _seeds_to_yaml(seeds: Sequence[int]) -> Any:
    if isinstance(seeds, range):
        return {"count": len(seeds), "base": seeds.start}
    return list(seeds)


def seeds_overlap(first: Sequence[int], second: Sequence[int]) -> bool:
    """Whether two prompts' seeds share one (ranges are never expanded)."""
    if isinstance(first, range) and isinstance(second, range):
        return max(first.start, second.start) < min(first.stop, second.stop)
    small, large = (first, second) if len(first) <= len(second) else (second, first)
    lookup = large if isinstance(large, range) else set(large)
    return any(seed in lookup for seed in small)
