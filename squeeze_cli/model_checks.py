"""Everything about the model that can be checked before loading it: local weight folders, hub ids in the
offline cache, the device and the offload mode.

`validate` and the start of `gen` both ask here (through `manifest.resolve` for the model section, through
`device_problem` for the flags), so a missing folder or a GPU that is not there is an exit-2 error found
in a second, not a traceback after minutes of loading. Torch-free unless a GPU device is named.
"""

from __future__ import annotations

import functools
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # shared by the manifest layer and gen: imports none of squeeze's layers
    from squeeze_cli.manifest.schema import ModelSpec

# The file `from_pretrained` reads first in each component's folder: present means "this is the folder".
_FIRST_FILE = {
    "pipeline": "model_index.json",
    "mllm": "config.json",
    "aggregator": "config.json",
    "transformer": "config.json",
    "vae": "config.json",
    "tokenizer": "tokenizer_config.json",
    "image_processor": "preprocessor_config.json",
    "scheduler": "scheduler_config.json",
}
# What `gen` says of pickle weights it refused, and what `validate` says of a folder that holds only those.
PICKLE_HINT = "squeeze loads safetensors only; pass --allow-pickle if you trust these pickle (.bin) weights"
# What a weights file that is cut short, empty or not safetensors at all gets (see `damaged_weights`).
DAMAGED_HINT = "copy or download the weights again (an interrupted copy or download leaves such files)"
# safetensors' own bound on a header: a longer length field means the file is not safetensors.
_SAFETENSORS_HEADER_MAX = 100_000_000
# Off the network a hub request is retried for ~40 s before it fails: one quick request says so at once.
HUB_PROBE_SECONDS = 1.5
# Small parts first: they are the likeliest to be missing (trained locally) and the quickest to load.
LOAD_ORDER = ("aggregator", "scheduler", "tokenizer", "image_processor", "vae", "mllm", "transformer")


@dataclass(frozen=True)
class SourceProblem:
    """A model source that cannot be loaded; `field` is the dotted key that sets it (`model.lora.path`)."""

    field: str
    message: str
    hint: str
    absent: bool = False  # the folder or hub repo is not there at all (not merely incomplete)


def is_local(path: str) -> bool:
    """After `resolve_model_paths` every local path is absolute; anything else is a hub id."""
    return os.path.isabs(os.path.expanduser(path))


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def source_problems(model: ModelSpec, *, allow_pickle: bool = False) -> list[SourceProblem]:
    """Why the model section's weights cannot be found, one problem per source; loads nothing.

    Local folders must exist (with the file `from_pretrained` reads first); hub ids must be in the Hugging
    Face cache with ``HF_HUB_OFFLINE`` set, or when the hub does not answer one quick request. A LoRA
    folder must hold a .safetensors file (or, with `allow_pickle`, a .bin one), as `gen` loads it.
    """
    sources: list[tuple[str, str, str | None, str | None, str | None]] = []  # field, path, sub, rev, file
    if model.pipeline is not None:
        sources.append(("model.pipeline", model.pipeline, None, None, _FIRST_FILE["pipeline"]))
    for name, source in model.components.items():
        sources.append(
            (
                f"model.components.{name}.path",
                source.path,
                source.subfolder,
                source.revision,
                _FIRST_FILE[name],
            )
        )
    if model.lora is not None:
        sources.append(("model.lora.path", model.lora.path, None, None, model.lora.weight_name))
    problems: list[SourceProblem] = []
    seen: set[tuple[str, str | None, str | None, str | None]] = set()
    missing: set[tuple[str, str | None]] = set()  # folders or repos already reported as absent
    for field, path, subfolder, revision, first_file in sources:
        key = (path, subfolder, revision, first_file)
        # Tokenizer, image processor and MLLM often share one folder: one line for an absent one.
        if key in seen or (path, revision) in missing:
            continue
        seen.add(key)
        problem = (
            _local_problem(field, path, subfolder, first_file, allow_pickle, _parts_in_folder(model))
            if is_local(path)
            else None
        )
        if problem is None and not is_local(path):
            problem = _cache_problem(field, path, subfolder, revision, first_file)
            if problem is not None and not offline():  # online, a hub id need not be cached yet
                problem = _unreachable_problem(problem, path) if hub_unreachable() else None
        if problem is not None:
            problems.append(problem)
            if problem.absent:
                missing.add((path, revision))
    return problems


def _local_problem(
    field: str,
    path: str,
    subfolder: str | None,
    first_file: str | None,
    allow_pickle: bool,
    parts: Mapping[str, bool] | None = None,
) -> SourceProblem | None:
    """What is wrong with a local folder; `parts` names the component folders a full checkpoint
    (`model.pipeline`) must hold besides those its model_index.json names (`_parts_in_folder`)."""
    folder = Path(path).expanduser()
    fix = f"fix `{field}` in the recipe or manifest, or override it with --set {field}=DIR"
    if not folder.exists():
        if folder.is_symlink():
            return SourceProblem(field, f"{path} is a link to nothing (broken, or a loop)", fix, absent=True)
        return SourceProblem(field, f"no such folder: {path}", fix, absent=True)
    if field == "model.lora.path":
        return _lora_problem(field, path, folder, first_file, allow_pickle)
    if not folder.is_dir():
        return SourceProblem(field, f"{path} is not a folder", fix)
    if subfolder:
        folder = folder / subfolder
        if not folder.is_dir():
            return SourceProblem(field, f"{path} has no subfolder {subfolder!r}", fix)
    if first_file and not (folder / first_file).is_file():
        return SourceProblem(
            field, f"{folder} has no {first_file}: not a saved checkpoint", f"{fix}; it must be a saved model"
        )
    if field == "model.pipeline" and (missing := _missing_component(folder, parts or {})):
        return SourceProblem(
            field,
            missing,
            f"{fix}; it must be a complete checkpoint of `model.pipeline_class` (squeeze unless set)",
        )
    # A full checkpoint's weights sit in its component folders; a component's, in its own folder.
    # (glob, unlike iterdir, passes over a folder it may not read: loading will say more.)
    folders = {folder}
    if field == "model.pipeline":
        folders.update(weights.parent for weights in folder.glob("*/*.safetensors*"))
    for weights in sorted(folders):
        if damage := damaged_weights(weights):
            return SourceProblem(field, damage, DAMAGED_HINT)
    return None


def _lora_problem(
    field: str, path: str, folder: Path, weight_name: str | None, allow_pickle: bool
) -> SourceProblem | None:
    """A LoRA is a file of weights, or a folder holding one: `squeeze train` writes RUN/stageN/lora with
    pytorch_lora_weights.safetensors, and diffusers loads a folder's .safetensors file (.bin with
    --allow-pickle) unless `weight_name` names the file."""
    if folder.is_file():
        return _pickle_file_problem(field, path, folder.name, allow_pickle)
    fix = (
        "give the folder `squeeze train` wrote (RUN/stage2/lora, which holds "
        f"pytorch_lora_weights.safetensors) or the .safetensors file: --set {field}=PATH"
    )
    if not folder.is_dir():
        return SourceProblem(field, f"{path} is not a folder or a file", fix)
    if weight_name is not None:
        if (folder / weight_name).is_file():
            return _pickle_file_problem(field, f"{path}/{weight_name}", weight_name, allow_pickle)
        return SourceProblem(
            field,
            f"{path} has no {weight_name}",
            "fix `model.lora.weight_name`, or remove it to load the folder's weights",
        )
    if any(folder.glob("*.safetensors")):
        return _damage_problem(field, damaged_weights(folder))
    if not any(folder.glob("*.bin")):
        return SourceProblem(field, f"{path} holds no LoRA weights (no .safetensors file)", fix)
    if not allow_pickle:  # `gen` would refuse it only after loading the whole model
        return SourceProblem(
            field, f"{path} holds only pickle (.bin) LoRA weights, no .safetensors file", PICKLE_HINT
        )
    return None


def _pickle_file_problem(field: str, path: str, name: str, allow_pickle: bool) -> SourceProblem | None:
    """A LoRA file named outright (the path, or `weight_name`) is loaded whatever its format: one that is
    not .safetensors is pickle, refused without --allow-pickle as a folder's .bin files are."""
    if name.endswith(".safetensors"):
        return _damage_problem(field, damaged_safetensors(Path(path).expanduser()))
    if allow_pickle:
        return None
    return SourceProblem(field, f"{path} is not a .safetensors file (pickle weights)", PICKLE_HINT)


def _parts_in_folder(model: ModelSpec) -> dict[str, bool]:
    """The components `model.pipeline`'s folder must hold, each True, or may lack, False: the squeeze
    pipeline (`pipeline_class` unset) loads each of its parts from there unless `model.components` names
    it, as does any pipeline with the parts its model_index.json names."""
    parts = dict.fromkeys(LOAD_ORDER, True) if model.pipeline_class is None else {}
    return {**parts, **dict.fromkeys(model.components, False)}


def _missing_component(folder: Path, parts: Mapping[str, bool]) -> str | None:
    """The first component folder that `folder` must hold (`_parts_in_folder`) and does not, or why its
    model_index.json cannot be read; None when all are there. A component named `[null, null]` is
    optional."""
    index = folder / "model_index.json"
    try:
        entries = json.loads(index.read_bytes())
    except OSError as error:
        return f"{index} cannot be read: {error.strerror or error}"
    except ValueError:
        entries = None
    if not isinstance(entries, dict):
        return f"{index} is damaged: not a JSON object"
    required = dict(parts)
    for name, entry in entries.items():
        if not name.startswith("_") and isinstance(entry, list) and None not in entry:
            required.setdefault(name, True)
    for name in sorted(name for name, needed in required.items() if needed):
        if not (folder / name).is_dir():
            named = "its model_index.json names" if name in entries else "the squeeze pipeline loads"
            return f"{folder} has no {name}/ folder, which {named}"
    return None


def _damage_problem(field: str, damage: str | None) -> SourceProblem | None:
    return SourceProblem(field, damage, DAMAGED_HINT) if damage else None


def damaged_weights(folder: Path) -> str | None:
    """What is wrong with the safetensors weights in `folder` (not its subfolders), read from their
    headers and sizes only: a file that is damaged (`damaged_safetensors`), or a shard that the folder's
    `*.safetensors.index.json` names and that is not there. None when nothing is."""
    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_bytes())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is damaged: not a safetensors index (JSON with a `weight_map`)"
        for shard in sorted(str(name) for name in shards):
            if not (folder / shard).exists():
                return f"{folder / shard} is missing: {index.name} names it"
    for weights in sorted(folder.glob("*.safetensors")):
        if damage := damaged_safetensors(weights):
            return damage
    return None


def damaged_safetensors(path: Path) -> str | None:
    """Why the .safetensors file at `path` cannot load, from its header alone (a few kB, never the weights):
    not a regular file, empty, a header that is not safetensors' JSON, or fewer bytes than the header says
    (an interrupted copy or download). None when it looks whole."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):  # a FIFO would block the reader
            return f"{path} is not a regular file"
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            if info.st_size < 8 or length > min(info.st_size - 8, _SAFETENSORS_HEADER_MAX):
                return f"{path} is damaged: {info.st_size:,} bytes, cut short or not safetensors"
            header = json.loads(file.read(length))
        end = max(
            (int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
            default=0,
        )
    except OSError as error:
        return f"{path} cannot be read: {error.strerror or error}"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return f"{path} is damaged: its header is not safetensors'"
    if info.st_size < 8 + length + end:
        return f"{path} is cut short: {info.st_size:,} bytes where its header needs {8 + length + end:,}"
    return None


def _cache_problem(
    field: str, repo_id: str, subfolder: str | None, revision: str | None, first_file: str | None
) -> SourceProblem | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    hint = f"HF_HUB_OFFLINE is set: download it first (`hf download {repo_id}`), or unset HF_HUB_OFFLINE"
    try:
        snapshot = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return SourceProblem(field, f"{repo_id} is not in the Hugging Face cache", hint, absent=True)
    wanted = snapshot / subfolder if subfolder else snapshot
    if first_file and not (wanted / first_file).is_file():
        where = f"{repo_id}/{subfolder}" if subfolder else repo_id
        return SourceProblem(field, f"{where} in the Hugging Face cache has no {first_file}", hint)
    return None


@functools.cache
def hub_unreachable() -> str | None:
    """Why the Hugging Face hub (``HF_ENDPOINT``) does not answer, asked once per process with one request
    of at most `HUB_PROBE_SECONDS`; None when it answers (any HTTP status: the network is there)."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        with urllib.request.urlopen(
            urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=HUB_PROBE_SECONDS
        ):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as error:
        return f"{constants.ENDPOINT}: {getattr(error.reason, 'strerror', None) or error.reason}"
    except (OSError, ValueError) as error:  # a timeout, a reset, a broken endpoint address
        return f"{constants.ENDPOINT}: {getattr(error, 'strerror', None) or error or type(error).__name__}"


def read_cache_only_if_hub_unreachable(model: ModelSpec) -> str | None:
    """Off the network, `from_pretrained` asks the hub about a cached hub id before reading the cache (about
    40 s of retries): when the hub does not answer one quick request, this process reads the cache only,
    as with ``HF_HUB_OFFLINE=1``. Returns the line that says so, or None (online, offline already, or no hub
    id in the model section)."""
    paths = [model.pipeline, *(source.path for source in model.components.values())]
    if model.lora is not None:
        paths.append(model.lora.path)
    if (
        offline()
        or all(path is None or is_local(path) for path in paths)
        or (reason := hub_unreachable()) is None
    ):
        return None
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, at import; its requests check the constant at call time.
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True
    return f"the hub does not answer ({reason}): loading from the local Hugging Face cache only"


def _unreachable_problem(cache_problem: SourceProblem, repo_id: str) -> SourceProblem:
    """What the cache lacks, and that the hub cannot supply it: say so now rather than after retries."""
    return SourceProblem(
        cache_problem.field,
        f"{cache_problem.message} and the hub is offline ({hub_unreachable()})",
        f"download it on a machine with network (`hf download {repo_id}`) into this machine's cache "
        "(HF_HOME), then set HF_HUB_OFFLINE=1",
        absent=cache_problem.absent,
    )


def device_problem(device: str, offload: str) -> tuple[str, str] | None:
    """``(message, hint)`` when `device` does not exist here or `offload` cannot run on it, else None.

    Imports torch only to ask about a GPU."""
    if offload != "none" and device == "cpu":
        return f"--offload {offload} moves weights to a GPU, but the device is cpu", "use --offload none"
    if device == "cpu" or (device == "auto" and offload == "none"):
        return None
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return None
        return f"--offload {offload} needs a CUDA GPU and none is visible", "use --offload none"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        return f"--device {device}: not a device name", "use auto, cpu, cuda, cuda:1 or mps"
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return f"--device {device}: no CUDA GPU is visible on this machine", "use --device cpu (or auto)"
        if parsed.index is not None and parsed.index >= count:
            return (
                f"--device {device}: this machine has {count} CUDA GPU{'s' if count > 1 else ''}",
                f"use cuda:0 ... cuda:{count - 1}",
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            return f"--device {device}: Apple's MPS is not available here", "use --device cpu (or auto)"
    else:
        return f"--device {device}: squeeze runs on cpu, cuda or mps", "use --device auto"
    if offload != "none" and parsed.type != "cuda":
        return f"--offload {offload} needs a CUDA GPU, but the device is {device}", "use --offload none"
    return None
