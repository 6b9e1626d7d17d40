"""What a resolved manifest is: `LoadedManifest` (with its subjects and prompts), all the planner needs,
and how it writes itself back as `manifest.resolved.yaml`. `resolve.py` makes one from the file."""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Sequence
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
        """A self-contained manifest that plans the same jobs: every path absolute, every value explicit,
        the sampling parameters and seeds most prompts share in `defaults` and the others on their prompts.

        Written as ``manifest.resolved.yaml`` next to the outputs, so a run can be reproduced from it. Only
        the sampling keys the model's pipeline reads are written (validation refuses the others; left out,
        they keep their defaults, so the job ids are the same).
        """
        writer = _ResolvedWriter(self)
        return {**writer.head, "subjects": [writer.subject(subject) for subject in self.subjects]}

    def resolved_fingerprint(self, shard: tuple[int, int] | None = None) -> str:
        """A hash of what `resolved_yaml` writes, recorded in its header: a rerun whose file already has it
        skips the YAML (libyaml takes most of a no-op rerun at 100,000 jobs; this takes a second). Hashed
        subject by subject, so that the whole document is never held at once."""
        return _ResolvedWriter(self).fingerprint(self.subjects, shard)

    def resolved_yaml(self, shard: tuple[int, int] | None = None) -> str:
        """`resolved_dict` as YAML; a shard's copy says which part of the plan it ran (a comment: the
        file stays a manifest that plans every job)."""
        writer = _ResolvedWriter(self)
        header = "# Written by squeeze: the manifest as it was run, every value explicit.\n"
        header += f"{RESOLVED_FINGERPRINT_PREFIX}{writer.fingerprint(self.subjects, shard)}\n"
        if shard is not None:
            header += (
                f"# This is shard {shard[0]}/{shard[1]} (--shard {shard[0]}/{shard[1]}): it ran part "
                f"{shard[0]} (0-based) of the {shard[1]} parts of this plan.\n"
            )
        # Subject by subject: libyaml's dump of the whole document at once held 1.2 GB at 100,000 jobs.
        subjects = "".join(_yaml([writer.subject(subject)]) for subject in self.subjects)
        return header + _yaml(writer.head) + ("subjects:\n" + subjects if subjects else "subjects: []\n")


class _ResolvedWriter:
    """How `LoadedManifest.resolved_dict` writes the manifest back: the set of sampling parameters and the
    seeds that most prompts share go into `defaults`, and each prompt carries only what differs from them
    (written in full on every prompt, 100,000 prompts made 31 MB of YAML that `status`, `eval` and
    `export` spent a minute and 2 GB reading back)."""

    def __init__(self, manifest: LoadedManifest):
        self._used = pipeline_spec(manifest.model.pipeline_class).sampling_parameters
        self._written: dict[SamplingParams, dict[str, Any]] = {}
        self._differing: dict[SamplingParams, dict[str, Any]] = {}
        prompts = [prompt for subject in manifest.subjects for prompt in subject.prompts]
        params = Counter(prompt.params for prompt in prompts).most_common(1)
        seeds = Counter(_seeds_key(prompt.seeds) for prompt in prompts).most_common(1)
        self._defaults = self._written_params(params[0][0]) if params else {}
        self._seeds = seeds[0][0] if seeds else None
        defaults = {**self._defaults, "seeds": _seeds_to_yaml(seeds[0][0])} if seeds else None
        document = manifest.document
        self.head: dict[str, Any] = {
            "version": MANIFEST_VERSION,
            **({"recipe": manifest.recipe.source} if manifest.recipe is not None else {}),
            "model": manifest.model.model_dump(mode="json"),
            "output": {**document.output.model_dump(mode="json"), "dir": str(manifest.output_dir)},
            "max_jobs": manifest.max_jobs,
            **({"defaults": defaults} if defaults is not None else {}),
            **({"quality": document.quality.model_dump(mode="json")} if document.quality else {}),
            **({"acknowledge_license": document.acknowledge_license} if document.acknowledge_license else {}),
        }

    def _written_params(self, params: SamplingParams) -> dict[str, Any]:
        """The sampling keys the pipeline reads, as the manifest writes them."""
        if params not in self._written:
            self._written[params] = {k: v for k, v in params.to_dict().items() if k in self._used}
        return self._written[params]

    def _differing_params(self, params: SamplingParams) -> dict[str, Any]:
        """What a prompt with `params` must say beside `defaults`; a key `defaults` has and `params` does
        not write (`step_cache` off) is written as null."""
        if params not in self._differing:
            written = self._written_params(params)
            self._differing[params] = {
                **{key: None for key in self._defaults if key not in written},
                **{
                    key: value for key, value in written.items() if self._defaults.get(key, _MISSING) != value
                },
            }
        return self._differing[params]

    def fingerprint(self, subjects: Iterable[ResolvedSubject], shard: tuple[int, int] | None) -> str:
        """`LoadedManifest.resolved_fingerprint`: the head, then each subject, as canonical JSON."""

        def encoded(value: Any) -> bytes:
            return json.dumps(value, sort_keys=True, default=str).encode()

        hasher = hashlib.sha256(encoded([shard, self.head]))
        for subject in subjects:
            hasher.update(encoded(self.subject(subject)))
        return hasher.hexdigest()

    def subject(self, subject: ResolvedSubject) -> dict[str, Any]:
        return {
            "name": subject.name,
            **({"class": subject.class_noun} if subject.class_noun is not None else {}),
            "references": list(subject.references),
            "prompts": [self._prompt(prompt) for prompt in subject.prompts],
        }

    def _prompt(self, prompt: ResolvedPrompt) -> str | dict[str, Any]:
        """A prompt as the manifest writes it: its text alone when `defaults` say the rest."""
        written = {
            **self._differing_params(prompt.params),
            # a swept value as a sweep of one: the same job, still labelled in grids
            **{key: [prompt.params.to_dict()[key]] for key, _ in prompt.sweep},
            **({"seeds": _seeds_to_yaml(prompt.seeds)} if _seeds_key(prompt.seeds) != self._seeds else {}),
        }
        return {"text": prompt.template, **written} if written else prompt.template


_MISSING = object()


def _seeds_key(seeds: Sequence[int]) -> range | tuple[int, ...]:
    """Seeds as a hashable value that tells a range from a list of the same seeds (they write differently)."""
    return seeds if isinstance(seeds, range) else tuple(seeds)


@functools.cache
def _dumper(base: type) -> type:
    """`base` writing a value that several prompts share in full each time, never as a YAML alias."""
    return type("ResolvedDumper", (base,), {"ignore_aliases": lambda self, data: True})


def _yaml(value: Any) -> str:
    # libyaml's dumper when PyYAML has it: several times faster than pure Python, same text.
    dumper = _dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper))
    return yaml.dump(
        value, Dumper=dumper, sort_keys=False, allow_unicode=True, width=1000, default_flow_style=False
    )


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
