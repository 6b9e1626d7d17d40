"""`squeeze dreambench`: the DreamBench manifest from the official dataset layout. Torch-free.

The layout (github.com/google/dreambooth, `dataset/`): `prompts_and_classes.txt` (a `subject_name,class`
table, then the 25 object prompts and the 25 live-subject prompts as Python `'a {0} {1} ...'.format(
unique_token, class_token)` lines) and one folder of reference photos per subject.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

import yaml

from squeeze_cli import outputs
from squeeze_cli.errors import SqueezeError, UsageError
from squeeze_cli.reading import MANIFEST_MAX_BYTES, file_kind, read_regular_file

PROMPTS_FILE = "prompts_and_classes.txt"
PROMPTS_PER_KIND = 25
# DreamBooth's live subjects are its cats and dogs; every other subject is an object.
LIVE_CLASSES = frozenset({"cat", "dog"})
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
_PROMPT_RE = re.compile(r"^\s*'(?P<text>[^']*)'\.format\(")
_CLASS_RE = re.compile(r"^(?P<name>[A-Za-z0-9_\-]+),(?P<class>[^,]+)$")


class DatasetError(SqueezeError):
    """A DreamBench dataset folder that cannot be read (exit code 2)."""


@dataclass(frozen=True)
class DreamBenchSubject:
    name: str
    class_noun: str
    live: bool
    images: tuple[Path, ...]


def _squeeze_prompt(text: str) -> str:
    """`a {0} {1} in the jungle` -> `a {class} in the jungle`: the subject comes from its references,
    so the unique token goes and the class noun stays, as in the prompt CLIP-T scores."""
    text = text.replace("{0} {1}", "{class}").replace("{1}", "{class}").replace("{0} ", "").replace("{0}", "")
    return text


def parse_prompts_and_classes(path: Path) -> tuple[dict[str, str], list[str], list[str]]:
    """(`{subject: class}`, object prompts, live-subject prompts), prompts in squeeze's `{class}` form.

    Raises:
        `DatasetError`: when the file is missing or does not hold 25 + 25 prompts.
    """
    hint = f"give the DreamBench `dataset` folder, the one with {PROMPTS_FILE} and one folder per subject"
    try:  # a FIFO or a device in its place is refused at once; an endless file is not read whole
        data = read_regular_file(path, MANIFEST_MAX_BYTES)
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}", hint) from error
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise DatasetError(
            f"cannot read {path}: not UTF-8 text (byte {error.start})",
            "use the unmodified prompts_and_classes.txt of the DreamBench dataset",
        ) from error
    classes: dict[str, str] = {}
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for line in lines:
        stripped = line.strip()
        if stripped.lower().startswith("object prompts"):
            section = "object"
        elif stripped.lower().startswith("live subject prompts"):
            section = "live"
        elif section and (match := _PROMPT_RE.match(line)):
            prompts[section].append(_squeeze_prompt(match["text"]))
        elif section is None and (match := _CLASS_RE.match(stripped)) and match["name"] != "subject_name":
            classes[match["name"]] = match["class"].strip()
    for kind, found in prompts.items():
        if len(found) != PROMPTS_PER_KIND:
            raise DatasetError(
                f"{path}: found {len(found)} {kind} prompts, expected {PROMPTS_PER_KIND}",
                "use the unmodified prompts_and_classes.txt of the DreamBench dataset",
            )
    if not classes:
        raise DatasetError(f"{path}: no `subject_name,class` lines", "use the unmodified DreamBench file")
    return classes, prompts["object"], prompts["live"]


def reference_images(folder: Path) -> tuple[Path, ...]:
    """The photos in a subject's folder, sorted: regular image files (a link to one counts), not hidden
    names (macOS's `._00.jpg` beside `00.jpg` is no photo), nor folders, FIFOs or broken links."""
    return tuple(
        sorted(
            path
            for path in folder.iterdir()
            if path.suffix.lower() in _IMAGE_SUFFIXES and not path.name.startswith(".") and _is_regular(path)
        )
    )


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)  # follows a link: a broken one is no file
    except OSError:
        return False


def read_dataset(
    dataset_dir: str | os.PathLike,
) -> tuple[list[DreamBenchSubject], list[str], list[str], list[str]]:
    """The subjects present in `dataset_dir` (sorted by name), the two prompt lists, and the names
    listed in the file whose folder is absent (a partial copy of the dataset)."""
    root = Path(dataset_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder", "give the DreamBench `dataset` folder")
    classes, object_prompts, live_prompts = parse_prompts_and_classes(root / PROMPTS_FILE)
    subjects, absent = [], []
    for name, class_noun in sorted(classes.items()):
        folder = root / name
        if not folder.is_dir():
            absent.append(name)
            continue
        images = reference_images(folder)
        if not images:
            raise DatasetError(f"{folder}: no images", "each subject folder holds its reference photos")
        subjects.append(DreamBenchSubject(name, class_noun, class_noun in LIVE_CLASSES, images))
    if not subjects:
        raise DatasetError(f"{root}: none of the {len(classes)} subjects of {PROMPTS_FILE} has a folder here")
    return subjects, object_prompts, live_prompts, absent


def _reference_count(references: str) -> int | None:
    """`first` -> 1, `N` -> N, `all` -> None (every image)."""
    if references == "all":
        return None
    if references == "first":
        return 1
    if references.isascii() and references.isdigit() and int(references) > 0:
        return int(references)
    raise UsageError(f"--references {references!r}: expected first, a number, or all", "e.g. --references 3")


def build_manifest(
    dataset_dir: str | os.PathLike,
    manifest_path: str | os.PathLike,
    *,
    references: str = "first",
    seeds: int = 4,
    recipe: str = "paper-internvl3-flux",
) -> tuple[str, dict]:
    """The manifest's YAML text and a summary. Reference paths are relative to the manifest's folder
    when the dataset is inside it (they then move together), absolute otherwise."""
    count = _reference_count(references)
    subjects, object_prompts, live_prompts, absent = read_dataset(dataset_dir)
    manifest_dir = Path(manifest_path).resolve().parent
    entries = []
    for subject in subjects:
        chosen = subject.images if count is None else subject.images[:count]
        paths = []
        for image in chosen:
            image = image.resolve()
            path = str(image.relative_to(manifest_dir) if manifest_dir in image.parents else image)
            # A manifest's reference is a glob: a photo named `b[1].jpg` would match `b1.jpg` instead.
            paths.append(glob.escape(path))
        entries.append(
            {
                "name": subject.name,
                "class": subject.class_noun,
                "references": [p.replace(os.sep, "/") for p in paths],
                "prompts": list(live_prompts if subject.live else object_prompts),
            }
        )
    document = {
        "version": 1,
        "recipe": recipe,
        "output": {"dir": "squeeze-out/dreambench"},
        "defaults": {"seeds": {"count": seeds, "base": 0}},
        "subjects": entries,
    }
    dataset = _shell_word(str(Path(dataset_dir).resolve()))
    header = (
        "# DreamBench (Ruiz et al., DreamBooth, CVPR 2023): every subject of the dataset x its 25 prompts\n"
        f"# (object or live-subject list) x {seeds} seeds. Written by `squeeze dreambench {dataset}`.\n"
        f"# References that condition generation: {references}.\n"
        "#\n"
        "#   squeeze gen THIS.yaml\n"
        f"#   squeeze eval squeeze-out/dreambench --references {dataset}   # compare with every reference\n"
        "#\n"
        "# See docs/evaluation.md for the protocol and the numbers to compare with.\n"
    )
    body = yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=110)
    summary = {
        "subjects": len(subjects),
        "live": sum(s.live for s in subjects),
        "prompts": sum(len(e["prompts"]) for e in entries),
        "jobs": sum(len(e["prompts"]) for e in entries) * seeds,
        "absent": absent,
    }
    return header + body, summary


def _shell_word(text: str) -> str:
    """`text` as one word of a shell command, on one line: the header's commands are comments to copy, and a
    newline in a folder's name would end the comment and put the rest into the manifest."""
    if text.isprintable():
        return shlex.quote(text)
    # Each \xHH in bash's $'...' is one byte: an escaped character goes as its UTF-8 bytes.
    return "$'" + "".join(c if c.isprintable() and c not in "\\'" else _bytes(c) for c in text) + "'"


def _bytes(character: str) -> str:
    """`character`'s UTF-8 bytes as `\\xHH` escapes (U+2028 as `\\xe2\\x80\\xa8`)."""
    return "".join(f"\\x{byte:02x}" for byte in character.encode("utf-8", "surrogateescape"))


def _manifest_folder(output: Path, force: bool) -> Path:
    """The real folder the manifest goes in, refusing (exit 2, before any work) what `-o` must not replace:
    anything but a regular file (a link, a FIFO, a device, a folder: renaming over them would replace, say,
    /dev/null), and a regular file without `force`; and a path under something that is not a folder."""
    try:
        mode: int | None = os.lstat(output).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    except OSError as error:
        raise UsageError(f"-o {output}: {error.strerror or error}", "choose another -o") from error
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(
            f"-o {output}: is {file_kind(mode)}, not a regular file",
            "give a new file name, e.g. -o dreambench.yaml: --force replaces only a regular file",
        )
    if mode is not None and not force:
        raise UsageError(f"-o {output}: the file exists", "choose another name, or add --force to replace it")
    # The nearest existing folder above it must be a folder (a file there, or a broken link, is refused).
    ancestor = next((p for p in output.absolute().parents if os.path.lexists(p)), None)
    if ancestor is not None and not ancestor.is_dir():
        raise UsageError(
            f"-o {output}: {ancestor} is not a folder",
            "give the manifest's path in a folder, e.g. -o dreambench.yaml",
        )
    return Path(os.path.realpath(output.absolute().parent))


def write_dreambench_manifest(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike,
    *,
    references: str = "first",
    seeds: int = 4,
    recipe: str = "paper-internvl3-flux",
    force: bool = False,
) -> str:
    """Write the manifest to `output` (atomically; an existing file only with `force`); returns a
    short report for the terminal."""
    output = Path(output)
    folder = _manifest_folder(output, force)
    text, summary = build_manifest(dataset_dir, output, references=references, seeds=seeds, recipe=recipe)
    try:
        outputs.ensure_dir(folder)
        # Into the folder the user named (a link to a folder is the user's choice of place), by its own name:
        # the rename replaces only the regular file `_manifest_folder` let through.
        outputs.atomic_write_text(folder / output.name, text)
    except outputs.OutputWriteError as error:  # not gen's "finished images are kept": nothing was made
        raise UsageError(error.message, "choose another -o, in a folder you can write") from error
    lines = [
        f"wrote {output}: {summary['subjects']} subjects ({summary['live']} live), "
        f"{summary['prompts']} prompts, {summary['jobs']} images ({seeds} seeds per prompt)"
    ]
    if summary["absent"]:
        shown = ", ".join(summary["absent"][:5]) + (", ..." if len(summary["absent"]) > 5 else "")
        lines.append(
            f"note: {len(summary['absent'])} subjects of {PROMPTS_FILE} have no folder here: {shown}"
        )
    if recipe == "tiny":
        lines.append(f"next: squeeze validate {output}")
    else:  # the plan is checked without the recipe's weights, then with them
        lines.append(
            f"next: squeeze validate {output} --recipe tiny   # the plan, without {recipe}'s weights"
        )
        lines.append(f"then: squeeze validate {output}   # once {recipe}'s weights are in place")
    return "\n".join(lines)
