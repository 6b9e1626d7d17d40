"""From a loaded manifest to the ordered list of jobs, and from jobs to one process's shard.

Pure and torch-free: planning must be cheap enough to run on every ``validate`` and on every rank.
A job's ``job_id`` hashes everything that decides its pixels and where they are written (the subject's
name, which is its directory under the output folder) and nothing else, so a later run can tell which
outputs already exist even after the manifest was reformatted or its prompts and seeds reordered. Two
subjects with the same references, prompts and seeds are two sets of jobs, each with its own images.
"""

from __future__ import annotations

import bisect
import fnmatch
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from squeeze_cli.errors import ManifestError, Problem, UsageError
from squeeze_cli.manifest.loaded import too_many_jobs
from squeeze_cli.params import SamplingParams
from squeeze_cli.pipelines.registry import pipeline_spec

if TYPE_CHECKING:
    from squeeze_cli.manifest.loaded import LoadedManifest

# Bumped only when the hashing scheme itself changes (that invalidates every stored job id: a folder made
# under an older scheme is regenerated, since its sidecars name ids no job has any more).
# v2 (squeeze 0.1.x): the subject's name joined the id, so equal jobs in two subjects no longer collide.
JOB_ID_SCHEME = b"squeeze-job-v2\n"
JOB_ID_LENGTH = 16


@dataclass(frozen=True, slots=True)
class Job:
    """One image to generate."""

    index: int
    job_id: str
    subject: str
    subject_index: int
    class_noun: str | None
    prompt_index: int
    prompt: str
    seed: int
    params: SamplingParams
    references: tuple[str, ...]
    cost: float  # the pipeline's `estimate_cost`: shard balancing and validate's estimate
    sweep: str = ""  # `ResolvedPrompt.sweep_label`: which values of a sweep the job takes, for grids


def _reference_digest(manifest: LoadedManifest, subject: Any, path: str) -> bytes:
    """A reference's sha256 (`ReferenceFacts.digest`); a file that changed kind or vanished since
    validation is a problem."""
    try:
        return manifest.reference_facts.digest(path)
    except OSError as error:
        field = f"subjects[{subject.index}].references"
        message = f"{path}: cannot read it: {error.strerror or error}"
        hint = "the file changed since the manifest was checked: put the image back and run again"
        raise ManifestError([Problem(str(manifest.path), None, None, field, message, hint)]) from None


def _references_hasher(subject: str, reference_digests: Sequence[bytes]):
    hasher = hashlib.sha256(JOB_ID_SCHEME)
    # The subject is where the images live: equal jobs of two subjects are two images, not one.
    hasher.update(_canonical_json(subject).encode() + b"\n")  # JSON-quoted: self-delimiting
    for digest in reference_digests:  # fixed-size digests: concatenation is unambiguous
        hasher.update(digest)
    return hasher


# One encoder for every call: `json.dumps` with options builds a new one each time (a third of the cost of
# encoding 100,000 prompts).
_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)


def _prompt_hasher(references_hasher, prompt: str, params_json: str, model_json: str):
    # Everything except the seed goes into one prefix that each seed copies, so a 100k-job plan
    # hashes its JSON once per prompt, not once per job. The payload is exactly
    # _canonical_json({"model": ..., "params": ..., "prompt": ...}), assembled from cached parts; it is
    # self-delimiting, so appending "\nseed=<n>" cannot collide with another (prompt, seed) pair.
    hasher = references_hasher.copy()
    payload = f'{{"model":{model_json},"params":{params_json},"prompt":{_canonical_json(prompt)}}}'
    hasher.update(payload.encode())
    hasher.update(b"\nseed=")
    return hasher


def job_id(
    subject: str,
    reference_digests: Sequence[bytes],
    prompt: str,
    seed: int,
    params: SamplingParams,
    model_identity: str,
) -> str:
    """The id of one image: a hash of the subject's name (its place on disk), the references' bytes, the
    prompt, the seed, the params and the model."""
    hasher = _prompt_hasher(
        _references_hasher(subject, reference_digests),
        prompt,
        _canonical_json(params.to_dict()),
        _canonical_json(model_identity),
    )
    hasher.update(str(seed).encode())
    return hasher.hexdigest()[:JOB_ID_LENGTH]


def plan_jobs(manifest: LoadedManifest, *, model_identity: str, max_jobs: int) -> list[Job]:
    """Expand a loaded manifest into its jobs, ordered by subject, then prompt, then seed.

    Args:
        manifest (`LoadedManifest`): from `squeeze_cli.manifest.load_manifest`.
        model_identity (`str`): `squeeze_cli.manifest.recipes.model_identity` of the resolved model section.
        max_jobs (`int`): refuse plans larger than this before building anything.

    Raises:
        `ManifestError`: the plan has more than `max_jobs` jobs.
    """
    total = manifest.num_jobs
    if total > max_jobs:
        message, hint = too_many_jobs(total, max_jobs)
        raise ManifestError([Problem(str(manifest.path), None, None, "subjects", message, hint)])

    params_cache: dict[SamplingParams, str] = {}
    pipeline = pipeline_spec(manifest.model.pipeline_class)
    model_json = _canonical_json(model_identity)
    jobs: list[Job] = []
    append = jobs.append
    index = 0
    for subject in manifest.subjects:
        references = _references_hasher(
            subject.name,
            [_reference_digest(manifest, subject, path) for path in subject.references],
        )
        num_references = len(subject.references)
        for prompt in subject.prompts:
            params = prompt.params
            if params not in params_cache:  # prompts mostly share a few parameter sets
                params_cache[params] = _canonical_json(params.to_dict())
            params_json = params_cache[params]
            cost = pipeline.estimate_cost(params, num_references, prompt.text)
            prefix = _prompt_hasher(references, prompt.text, params_json, model_json)
            sweep = prompt.sweep_label
            for seed in prompt.seeds:
                hasher = prefix.copy()
                hasher.update(str(seed).encode())
                append(
                    Job(
                        index,
                        hasher.hexdigest()[:JOB_ID_LENGTH],
                        subject.name,
                        subject.index,
                        subject.class_noun,
                        prompt.index,
                        prompt.text,
                        seed,
                        params,
                        subject.references,
                        cost,
                        sweep,
                    )
                )
                index += 1
    return jobs


# Slicing ---------------------------------------------------------------------------------------------


def select_jobs(jobs: Sequence[Job], only: Sequence[str] = (), limit: int | None = None) -> list[Job]:
    """The jobs of the subjects that `only` names (fnmatch globs, any case; all subjects when empty), of
    the first `limit` of them in plan order. Jobs keep their ids: a slice and the whole plan share images.

    Raises:
        `UsageError`: a pattern matches no subject.
    """
    if not only and limit is None:
        return list(jobs)
    names = list(dict.fromkeys(job.subject for job in jobs))
    folded = [name.casefold() for name in names]
    chosen: set[str] = set()
    for pattern in only:
        matches = {names[i] for i in range(len(names)) if fnmatch.fnmatchcase(folded[i], pattern.casefold())}
        if not matches:
            shown = ", ".join(names[:5]) + (f", ... ({len(names):,} in all)" if len(names) > 5 else "")
            raise UsageError(f"--only {pattern}: no subject matches it", f"the subjects: {shown}")
        chosen |= matches
    kept = [name for name in names if not only or name in chosen][:limit]
    keep = set(kept)
    return [job for job in jobs if job.subject in keep]


# Sharding --------------------------------------------------------------------------------------------

# A cut moves to the nearest subject boundary when that costs at most this fraction of a fair share:
# a little imbalance is cheaper than encoding a subject's references on two processes.
SUBJECT_SNAP_TOLERANCE = 0.1
# Otherwise it moves to the nearest prompt boundary within this fraction of a fair share, so a prompt's
# seeds (one grid) stay in one shard unless a prompt is too large for the balance to allow it.
PROMPT_SNAP_TOLERANCE = 0.5


def shard_jobs(jobs: Sequence[Job], index: int, count: int) -> list[Job]:
    """The contiguous slice of `jobs` that process `index` of `count` runs.

    The plan is cut into `count` consecutive runs of about equal estimated cost; a cut snaps to a subject
    boundary when one is close, so subjects stay on one process where possible (each process then encodes
    a subject's references once), else to a prompt boundary, so a prompt's seeds stay together. Nothing
    is duplicated or padded: some shards may be empty, the
    shards in index order concatenate to `jobs`, and the result depends only on `jobs`, `index`, `count`.
    """
    if count < 1:
        raise ValueError(f"`count` must be at least 1, got {count}")
    if not 0 <= index < count:
        raise ValueError(f"`index` must be in [0, {count}), got {index}")
    if count == 1:
        return list(jobs)
    cuts = shard_boundaries(
        [job.cost for job in jobs],
        [job.subject_index for job in jobs],
        count,
        prompts=[(job.subject_index, job.prompt_index) for job in jobs],
    )
    return list(jobs[cuts[index] : cuts[index + 1]])


def _starts(groups: Sequence[Any]) -> list[int]:
    """Positions where a new group starts, plus both ends."""
    return [0] + [i for i in range(1, len(groups)) if groups[i] != groups[i - 1]] + [len(groups)]


def shard_boundaries(
    costs: Sequence[float], groups: Sequence[int], count: int, prompts: Sequence[Any] | None = None
) -> list[int]:
    """Cut positions ``[0, c1, ..., len(costs)]`` splitting `costs` into `count` balanced runs, snapped to
    a boundary of `groups` (subjects) when one is close, else of `prompts` (one key per job) when one is."""
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    total = prefix[-1]
    group_starts = _starts(groups)
    prompt_starts = _starts(prompts) if prompts is not None else None
    fair_share = total / count
    cuts = [0]
    for k in range(1, count):
        target = k * fair_share
        cut = _nearest(prefix, range(len(prefix)), target)
        snap = _nearest(prefix, group_starts, target)
        if abs(prefix[snap] - target) <= SUBJECT_SNAP_TOLERANCE * fair_share:
            cut = snap
        elif prompt_starts is not None:
            snap = _nearest(prefix, prompt_starts, target)
            if abs(prefix[snap] - target) <= PROMPT_SNAP_TOLERANCE * fair_share:
                cut = snap
        cuts.append(max(cut, cuts[-1]))
    cuts.append(len(costs))
    return cuts


def _nearest(prefix: Sequence[float], positions: Sequence[int], target: float) -> int:
    """The position in sorted `positions` whose cumulative cost is closest to `target` (ties: earlier)."""
    values = [prefix[p] for p in positions] if not isinstance(positions, range) else prefix
    i = bisect.bisect_left(values, target)
    if i == len(values):
        return positions[-1]
    if i > 0 and target - values[i - 1] <= values[i] - target:
        i -= 1
    return positions[i]
