"""`--shard`: which part of the plan this task runs, as `I/N` or from an array job's variables (Slurm,
Kubernetes Indexed Jobs, AWS Batch, Google Cloud Batch, or any two variables named by `env:`)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from squeeze_cli.errors import UsageError

# More shards than a plan has jobs (100,000 by default) only adds empty ones: a larger count is a typo,
# refused before the plan is cut (cutting it walks every shard's boundary).
MAX_SHARDS = 100_000
SHARD_METAVAR = "I/N|slurm|k8s/N|aws-batch|gcp-batch|env:INDEX_VAR/COUNT_VAR"
# The array-job services that export a 0-based task index and the task count: (index, count) variables.
ARRAY_JOB_VARIABLES = {
    "aws-batch": ("AWS_BATCH_JOB_ARRAY_INDEX", "AWS_BATCH_JOB_ARRAY_SIZE"),
    "gcp-batch": ("BATCH_TASK_INDEX", "BATCH_TASK_COUNT"),
}
# A Kubernetes Indexed Job exports the index only: its count (the Job's `completions`) is part of the flag.
K8S_INDEX_VARIABLE = "JOB_COMPLETION_INDEX"


def _number(text: str) -> int | None:
    """`text` as a whole number if it is ASCII digits, else None; one too long for any count (thousands of
    digits, which `int` refuses) is `MAX_SHARDS + 1`, too large for any shard's place or count."""
    if not (text.isascii() and text.isdigit()):  # isdigit alone accepts '²' and '١', which int refuses
        return None
    return int(text) if len(text.lstrip("0")) <= 18 else MAX_SHARDS + 1


def _too_many_shards(flag: str, count: int) -> None:
    if count > MAX_SHARDS:
        raise UsageError(
            f"{flag}: more than {MAX_SHARDS:,} shards", "give the number of tasks, e.g. --shard 0/8"
        )


def _shown(text: str) -> str:
    return text if len(text) <= 40 else f"{text[:37]}..."  # 5000 digits make no error line


def parse_shard(value: str | None, environ: Mapping[str, str] = os.environ) -> tuple[int, int] | None:
    """`--shard` as (index, count), 0-based; None without the flag.

    Raises:
        `UsageError`: a malformed value, or an array job's variable that is missing or not a number.
    """
    if value is None:
        return None
    if value == "slurm":
        return _slurm_shard(environ)
    if value in ARRAY_JOB_VARIABLES:
        return _variables_shard(f"--shard {value}", *ARRAY_JOB_VARIABLES[value], environ)
    if value == "k8s" or value.startswith("k8s/"):
        return _k8s_shard(value, environ)
    if value.startswith("env:"):
        index_name, _, count_name = value[len("env:") :].partition("/")
        if not index_name or not count_name:
            raise UsageError(
                f"--shard {_shown(value)}: expected env:INDEX_VAR/COUNT_VAR",
                "name the variables that hold the task's 0-based index and the task count, "
                "e.g. --shard env:TASK_INDEX/TASK_COUNT",
            )
        return _variables_shard(f"--shard {_shown(value)}", index_name, count_name, environ)
    index_text, _, count_text = value.partition("/")
    index, count = _number(index_text), _number(count_text)
    if index is None or count is None or not 0 <= index < count:
        raise UsageError(
            f"--shard {_shown(value)}: expected I/N with 0 <= I < N, or one of slurm, k8s/N, aws-batch, "
            "gcp-batch, env:INDEX_VAR/COUNT_VAR",
            "e.g. --shard 0/4 ... --shard 3/4",
        )
    _too_many_shards(f"--shard {_shown(value)}", count)
    return index, count


def _read_numbers(flag: str, names: tuple[str, ...], environ: Mapping[str, str], hint: str) -> list[int]:
    """The variables `names` as whole numbers; one error naming every one that is unset or not a number."""
    texts = {name: environ.get(name) for name in names}
    unset = [name for name, text in texts.items() if text is None or not text.strip()]
    bad = [name for name, text in texts.items() if name not in unset and _number(str(text).strip()) is None]
    if unset or bad:
        parts = []
        if unset:
            parts.append(f"{', '.join(unset)} {'is' if len(unset) == 1 else 'are'} not set")
        if bad:
            shown = ", ".join(f"{name}={_shown(str(texts[name]))!r}" for name in bad)
            parts.append(f"{shown} {'is' if len(bad) == 1 else 'are'} not a whole number")
        raise UsageError(f"{flag}: {'; '.join(parts)}", hint)
    return [int(_number(str(texts[name]).strip()) or 0) for name in names]


def _in_range(flag: str, index: int, count: int, index_text: str, what: str) -> tuple[int, int]:
    _too_many_shards(flag, count)
    if not 0 <= index < count:
        raise UsageError(
            f"{flag}: task {_shown(index_text.strip())} is not one of {count} tasks ({what})",
            "use --shard I/N",
        )
    return index, count


def _variables_shard(
    flag: str, index_name: str, count_name: str, environ: Mapping[str, str]
) -> tuple[int, int]:
    index, count = _read_numbers(
        flag,
        (index_name, count_name),
        environ,
        "run it as a task of an array job that sets them, or use --shard I/N",
    )
    return _in_range(flag, index, count, environ[index_name], f"{index_name} from 0 to {count_name} - 1")


def _k8s_shard(value: str, environ: Mapping[str, str]) -> tuple[int, int]:
    """`--shard k8s/N`: the pod's place in a Kubernetes Indexed Job of N completions."""
    flag = f"--shard {_shown(value)}"
    count = _number(value[len("k8s/") :]) if value.startswith("k8s/") else None
    if count is None or count < 1:
        raise UsageError(
            f"{flag}: expected k8s/N, N the Job's completions",
            "a Kubernetes Indexed Job exports the index only: give the count, e.g. --shard k8s/8",
        )
    (index,) = _read_numbers(
        flag,
        (K8S_INDEX_VARIABLE,),
        environ,
        "run it in a pod of a Job with `completionMode: Indexed`, or use --shard I/N",
    )
    return _in_range(
        flag, index, count, environ[K8S_INDEX_VARIABLE], f"{K8S_INDEX_VARIABLE} from 0 to {count - 1}"
    )


def _slurm_shard(environ: Mapping[str, str]) -> tuple[int, int]:
    """`--shard slurm`: this task's part of a Slurm job array, from the variables Slurm sets.

    With ``--array=1-8`` (or ``0-30:2``) the tasks are numbered from SLURM_ARRAY_TASK_MIN in steps of
    SLURM_ARRAY_TASK_STEP; the shard is the task's position among them, of SLURM_ARRAY_TASK_COUNT."""
    variables = {"SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "1", **environ}
    task, count, first, step = _read_numbers(
        "--shard slurm",
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"),
        variables,
        "run it as a task of a job array (sbatch --array=0-N), or use --shard I/N",
    )
    index, off_step = divmod(task - first, max(step, 1))
    _too_many_shards("--shard slurm: SLURM_ARRAY_TASK_COUNT", count)
    if off_step or not 0 <= index < count:
        raise UsageError(
            f"--shard slurm: task {_shown(variables['SLURM_ARRAY_TASK_ID'].strip())} is not one of {count} "
            f"tasks from {first} in steps of {step}",
            "use --shard I/N",
        )
    return index, count
