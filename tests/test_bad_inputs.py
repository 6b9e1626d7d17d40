"""A corpus of bad inputs, each run through the real console entry point (`squeeze gen`).

Every case must end the same way a user can rely on: exit code 2, one `error: ...` line last on stderr,
every problem line naming the file (with line and column, or the `--set` flag) and the fix where there is
an obvious one, no traceback, and nothing created: not the output directory, not a file next to the
manifest. The instruction-longer-than-context case needs the model's tokenizer and is checked by the
runner's tests, not here.
"""

from __future__ import annotations

import io
import os
import re
import struct
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, features

VALID = """\
version: 1
recipe: tiny
defaults:
  height: 32
  width: 32
  num_inference_steps: 2
subjects:
  - name: dog
    class: dog
    references: [refs/a.png]
    prompts:
      - a {class} in the snow
"""


def manifest(*, defaults: str = "", subject: str = "", top: str = "", refs: str = "[refs/a.png]") -> str:
    """VALID with one line changed or added: `defaults` becomes line 4 (replacing the key if VALID has
    it), `top` line 3 (after `recipe`), `subject` the line after `class: dog`; `refs` replaces the list."""
    lines = VALID.replace("references: [refs/a.png]", f"references: {refs}").splitlines()
    if defaults:
        key = defaults.split(":")[0]
        lines = [line for line in lines if not line.startswith(f"  {key}:")]
        lines.insert(3, f"  {defaults}")
    if subject:
        lines.insert(lines.index("    class: dog") + 1, f"    {subject}")
    if top:
        lines.insert(2, top)
    return "\n".join(lines) + "\n"


# Builders of broken files ----------------------------------------------------------------------------


def png_bytes(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 90).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def encoded(image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buffer, image_format)
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR declaring width x height, with a tiny (wrong) IDAT: a decompression bomb
    as far as the header is concerned."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write(folder: Path, relative: str, data: bytes | str) -> None:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


@dataclass(frozen=True)
class Case:
    """One bad input. `expect`: substrings of the problem lines; `@` stands for the manifest's path."""

    id: str
    text: str | bytes | None  # the manifest (None: `setup` makes it)
    expect: tuple[str, ...]
    setup: Callable[[Path], None] | None = None  # files beside the manifest (refs/a.png is always there)
    args: tuple[str, ...] = ()
    precreate_out: bool = False
    manifest_name: str = "manifest.yaml"


def _files(files: dict[str, bytes | str]) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        for name, data in files.items():
            write(folder, name, data)

    return setup


def _symlink(target: str, link: str) -> Callable[[Path], None]:
    def setup(folder: Path) -> None:
        (folder / link).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, folder / link)

    return setup


def _mkdir(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).mkdir(parents=True)


BILLION_LAUGHS = (
    "version: 1\nrecipe: tiny\na: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))
    + "subjects: [*i]\n"
)

CASES = [
    # The YAML itself -----------------------------------------------------------------------------------
    Case("malformed-yaml", "version: 1\nsubjects: [a, b\nrecipe: tiny\n", ("@:", "expected ',' or ']'")),
    Case("unclosed-quote", 'version: 1\nrecipe: "tiny\n', ("@:", "found unexpected end of stream")),
    Case(
        "key-indented-one-space-more",
        VALID.replace("  height: 32", "   height: 32"),
        ("@:5:3:", "did not find expected key", "hint: check the indentation", "keys of one mapping line up"),
    ),
    Case(
        "item-key-indented-one-space-less",
        VALID.replace("    references:", "   references:"),
        ("@:10:4:", "expected '-' indicator", "hint: check the indentation", "`-` items of one list"),
    ),
    Case("tab-indent", VALID.replace("    class: dog", "\tclass: dog"), ("@:9:", "never tabs")),
    Case(
        "duplicate-key",
        VALID.replace("    class: dog\n", "    class: dog\n    class: cat\n"),
        ("@:10:5: subjects[0].class: duplicate key `class` (first set on line 9)", "hint: keep only one"),
    ),
    Case("empty-file", "", ("@: the file is empty", "hint: ")),
    Case("only-a-comment", "# nothing here yet\n", ("@: the file is empty", "hint: ")),
    Case("only-whitespace", "\n\n   \n", ("@: the file is empty",)),
    Case("several-documents", VALID + "---\nversion: 1\n", ("@:", "a single document")),
    Case("top-level-list", "- version: 1\n- recipe: tiny\n", ("@:1:1: expected a mapping, got a list",)),
    Case("top-level-scalar", "hello\n", ("@:1:1: expected a mapping, got 'hello'",)),
    Case(
        "python-tag",
        VALID.replace("recipe: tiny", 'recipe: !!python/object/apply:os.system ["touch pwned"]'),
        ("@:2:9:", "python/object/apply:os.system", "hint: "),
    ),
    Case("custom-tag", VALID.replace("recipe: tiny", "recipe: !include other.yaml"), ("@:2:9:", "!include")),
    Case("billion-laughs", BILLION_LAUGHS, ("@:", "too many nodes", "hint: ")),
    Case("recursive-alias", "version: 1\nrecipe: tiny\nsubjects: &s [*s]\n", ("@:3:", "refers to itself")),
    Case("deep-nesting", "version: 1\nrecipe: tiny\nsubjects: " + "[" * 5000 + "]" * 5000 + "\n", ("@:3:",)),
    Case(
        "non-utf8",
        VALID.replace("snow", "sn\xf6w").encode("latin-1"),
        ("@:12:", "not UTF-8 text (byte 0xf6)", "hint: save it as UTF-8"),
    ),
    Case("utf16", VALID.encode("utf-16"), ("@: the manifest is UTF-16 text", "hint: save it as UTF-8")),
    Case("nul-byte", VALID.replace("snow", "sn\0w"), ("@:12:", "#x0000", "hint: ")),
    # The top level -------------------------------------------------------------------------------------
    Case("no-version", VALID.replace("version: 1\n", ""), ("missing required key `version`", "version: 1")),
    Case("version-2", VALID.replace("version: 1", "version: 2"), ("@:1:10: version: unsupported", "hint:")),
    Case(
        "version-string",
        VALID.replace("version: 1", 'version: "1"'),
        ("@:1:10: version: expected an integer",),
    ),
    Case(
        "unknown-top-key",
        manifest(top="ouptut: renders"),
        ("@:3:1: ouptut: unknown key `ouptut`", "hint: did you mean `output`?"),
    ),
    Case(
        "unknown-nested-key",
        manifest(defaults="guidance_scal: 3.0"),
        ("@:4:3: defaults.guidance_scal: unknown key", "did you mean `guidance_scale`?"),
    ),
    Case("no-subjects-key", "version: 1\nrecipe: tiny\n", ("missing required key `subjects`",)),
    Case(
        "empty-subjects", "version: 1\nrecipe: tiny\nsubjects: []\n", ("@:3:11: subjects: must not be empty",)
    ),
    Case(
        "null-subjects",
        "version: 1\nrecipe: tiny\nsubjects:\n",
        ("@:3:", "subjects: expected a list, got null"),
    ),
    Case(
        "subjects-mapping",
        "version: 1\nrecipe: tiny\nsubjects: {name: dog}\n",
        ("@:3:11: subjects: expected a list, got a mapping",),
    ),
    Case("max-jobs-zero", manifest(top="max_jobs: 0"), ("@:3:11: max_jobs: must be at least 1",)),
    Case("output-not-string", manifest(top="output: {dir: 5}"), ("@:3:15: output.dir: expected a string",)),
    Case(
        "output-dir-is-a-file",
        manifest(top="output: notes.txt"),
        ("@:3:9: output.dir:", "not a folder", "hint: "),
        setup=_files({"notes.txt": "hello"}),
        args=("--out", ""),  # no --out: the manifest's output.dir is used
    ),
    Case("output-dir-nul", manifest(top='output: "out\\0dir"'), ("@:3:9: output.dir:", "NUL")),
    # Subjects ------------------------------------------------------------------------------------------
    Case(
        "subject-no-references", manifest(refs="[]"), ("@:10:17: subjects[0].references: must not be empty",)
    ),
    Case(
        "subject-references-missing",
        VALID.replace("    references: [refs/a.png]\n", ""),
        ("@:8:5: subjects[0]: missing required key `references`",),
    ),
    Case(
        "subject-no-prompts",
        VALID.replace("    prompts:\n      - a {class} in the snow\n", "    prompts: []\n"),
        ("@:11:14: subjects[0].prompts: must not be empty",),
    ),
    Case(
        "subject-prompt-not-text",
        VALID.replace("      - a {class} in the snow", "      - 42"),
        ("@:12:9: subjects[0].prompts[0]: expected a prompt string or a mapping with `text`",),
    ),
    Case("empty-prompt", VALID.replace("a {class} in the snow", '"  "'), ("@:12:9:", "the prompt is empty")),
    Case(
        "subject-name-traversal",
        VALID.replace("name: dog", "name: ../x"),
        ("@:8:11: subjects[0].name:", "'../x' is not usable", "hint: "),
    ),
    Case("subject-name-slash", VALID.replace("name: dog", "name: a/b"), ("@:8:11:", "'a/b' is not usable")),
    Case(
        "subject-name-hidden", VALID.replace("name: dog", "name: .hidden"), ("@:8:11:", "'.hidden'", "hint:")
    ),
    Case(
        "subject-name-absolute", VALID.replace("name: dog", "name: /etc"), ("@:8:11:", "'/etc' is not usable")
    ),
    Case("subject-name-empty", VALID.replace("name: dog", 'name: ""'), ("@:8:11:", "is not usable")),
    Case(
        "subject-names-clash-by-case",
        VALID + "  - name: DOG\n    references: [refs/a.png]\n    prompts: [x]\n",
        ("@:13:11: subjects[1].name: subject name 'DOG' is already used by subjects[0]",),
    ),
    Case(
        "unknown-subject-key",
        manifest(subject="referenses: [refs/a.png]"),
        ("@:10:5: subjects[0].referenses: unknown key", "did you mean `references`?"),
    ),
    # References ----------------------------------------------------------------------------------------
    Case(
        "missing-reference",
        manifest(refs="[refs/missing.png]"),
        ("@:10:18: subjects[0].references[0]: no such file: 'refs/missing.png'", "relative to the manifest"),
    ),
    Case(
        "glob-matches-nothing",
        manifest(refs="[photos/*.jpg]"),
        ("@:10:18:", "no file matches 'photos/*.jpg'"),
    ),
    Case(
        "directory-as-reference",
        manifest(refs="[refs]"),
        (
            "@:10:18: subjects[0].references[0]: 'refs' is not a file",
            "hint: to use every image in it: 'refs/*'",
        ),
    ),
    Case(
        "zero-byte-image",
        manifest(refs="[refs/empty.png]"),
        ("@:10:18:", "refs/empty.png: the file is empty"),
        setup=_files({"refs/empty.png": b""}),
    ),
    Case(
        "text-file-named-png",
        manifest(refs="[refs/notes.png]"),
        ("@:10:18:", "refs/notes.png: not a readable image"),
        setup=_files({"refs/notes.png": "just some text, not a picture\n"}),
    ),
    Case(
        "truncated-png",
        manifest(refs="[refs/cut.png]"),
        ("@:10:18:", "refs/cut.png:", "truncated", "hint: "),
        setup=_files({"refs/cut.png": png_bytes((64, 64), "RGB")[:-40]}),
    ),
    Case(
        "corrupt-png-crc",
        manifest(refs="[refs/flip.png]"),
        ("@:10:18:", "refs/flip.png:", "damaged"),
        setup=lambda folder: write(
            folder, "refs/flip.png", (lambda d: d[:60] + bytes([d[60] ^ 0xFF]) + d[61:])(png_bytes((64, 64)))
        ),
    ),
    Case(
        "truncated-jpeg",
        manifest(refs="[refs/cut.jpg]"),
        ("@:10:18:", "refs/cut.jpg:", "truncated", "hint: "),
        setup=lambda folder: write(folder, "refs/cut.jpg", (lambda d: d[: len(d) * 2 // 3])(jpeg_bytes())),
    ),
    Case(
        "jpeg-header-only",
        manifest(refs="[refs/head.jpg]"),
        ("@:10:18:", "refs/head.jpg:"),
        setup=lambda folder: write(folder, "refs/head.jpg", jpeg_bytes()[:200]),
    ),
    Case(
        "truncated-webp",
        manifest(refs="[refs/cut.webp]"),
        ("@:10:18:", "refs/cut.webp: the file is damaged", "hint: "),
        setup=lambda folder: write(folder, "refs/cut.webp", (lambda d: d[: len(d) // 2])(encoded("WEBP"))),
    ),
    Case(
        "truncated-gif",
        manifest(refs="[refs/cut.gif]"),
        ("@:10:18:", "refs/cut.gif: the file is truncated", "hint: "),
        setup=lambda folder: write(folder, "refs/cut.gif", (lambda d: d[: len(d) // 2])(encoded("GIF"))),
    ),
    Case(
        "decompression-bomb",
        manifest(refs="[refs/bomb.png]"),
        ("@:10:18:", "refs/bomb.png:", "pixels"),
        setup=_files({"refs/bomb.png": png_header_only(100_000, 100_000)}),
    ),
    Case(
        "too-large-image",
        manifest(refs="[refs/large.png]"),
        ("@:10:18:", "refs/large.png: the image is too large: 9000x9000", "hint: "),
        setup=_files({"refs/large.png": png_header_only(9000, 9000)}),
    ),
    Case(
        "glob-catches-a-non-image",
        manifest(refs="[refs/*]"),
        ("@:10:18:", "refs/README.txt: not a readable image", "hint: "),
        setup=_files({"refs/README.txt": "photos of the dog\n"}),
    ),
    Case(
        "broken-symlink",
        manifest(refs="[refs/link.png]"),
        ("@:10:18:", "'refs/link.png' is a broken symbolic link"),
        setup=_symlink("/nonexistent/dog.png", "refs/link.png"),
    ),
    Case(
        "device-as-reference",
        manifest(refs="[/dev/zero]"),
        ("@:10:18:", "'/dev/zero' is not a regular file", "hint: "),
    ),
    Case("nul-in-reference-path", manifest(refs='["refs/a\\0.png"]'), ("@:10:18:", "NUL")),
    # Sampling parameters -------------------------------------------------------------------------------
    Case(
        "wrong-type-height",
        manifest(defaults="height: tall"),
        ("@:4:11: defaults.height: expected an integer, got 'tall'",),
    ),
    # (a list is a sweep: tests/test_sweeps.py)
    Case("wrong-type-guidance", manifest(defaults="guidance_scale: hi"), ("expected a number, got 'hi'",)),
    Case("wrong-type-bool", manifest(defaults="keep_mllm_condition: maybe"), ("expected true or false",)),
    Case(
        "null-value",
        manifest(defaults="width:"),
        ("@:4:9: defaults.width: expected a value, got null", "hint:"),
    ),
    Case(
        "size-zero",
        manifest(defaults="height: 0"),
        ("@:4:11: defaults.height: must be a multiple of 16", "hint: use 16"),
    ),
    Case(
        "size-negative", manifest(defaults="width: -64"), ("defaults.width: must be a multiple of 16", "-64")
    ),
    Case("size-not-16", manifest(defaults="height: 100"), ("defaults.height:", "got 100", "hint: use 96")),
    Case("size-huge", manifest(defaults="width: 100000"), ("defaults.width:", "hint: use 8192")),
    Case(
        "reference-size-odd",
        manifest(defaults="reference_size: 30"),
        ("defaults.reference_size:", "hint: use 32"),
    ),
    Case(
        "steps-zero",
        manifest(defaults="num_inference_steps: 0"),
        ("@:4:24: defaults.num_inference_steps:", "must be between 1 and 1000"),
    ),
    Case(
        "steps-negative",
        manifest(defaults="num_inference_steps: -3"),
        ("must be between 1 and 1000, got -3",),
    ),
    Case("steps-float", manifest(defaults="num_inference_steps: 2.5"), ("expected an integer, got 2.5",)),
    Case("guidance-negative", manifest(defaults="guidance_scale: -1"), ("must be a number ≥ 0, got -1",)),
    Case("guidance-nan", manifest(defaults="guidance_scale: .nan"), ("must be a number ≥ 0, got nan",)),
    Case("threshold-above-one", manifest(defaults="stage_thresholds: [1.5, 0.2]"), ("in [0, 1]", "hint:")),
    Case("threshold-negative", manifest(defaults="stage_thresholds: [0.5, -0.1]"), ("in [0, 1]",)),
    Case(
        "threshold-order",
        manifest(defaults="stage_thresholds: [0.85, 0.95]"),
        ("τ1 must be ≥ τ2", "hint: swap them: [0.95, 0.85]"),
    ),
    Case(
        "threshold-one-number", manifest(defaults="stage_thresholds: 0.9"), ("must be a list of two numbers",)
    ),
    Case("true-cfg-without-negative", manifest(defaults="true_cfg_scale: 4.0"), ("negative_prompt", "hint:")),
    # Seeds and job counts -------------------------------------------------------------------------------
    Case(
        "seed-float",
        manifest(defaults="seeds: [1.5]"),
        ("@:4:11: defaults.seeds[0]: expected an integer, got 1.5",),
    ),
    Case(
        "seed-string",
        manifest(defaults="seeds: [one]"),
        ("defaults.seeds[0]: expected an integer, got 'one'",),
    ),
    Case(
        "seed-negative",
        manifest(defaults="seeds: [-1]"),
        ("defaults.seeds[0]: seeds must be integers in [0",),
    ),
    Case("seed-too-big", manifest(defaults=f"seeds: [{2**63}]"), ("defaults.seeds[0]:", "2**63 - 1")),
    Case(
        "seed-bool", manifest(defaults="seeds: [true]"), ("defaults.seeds[0]: expected an integer, got True",)
    ),
    Case("seeds-repeated", manifest(defaults="seeds: [3, 3]"), ("seed 3 appears more than once", "hint:")),
    Case("seeds-empty", manifest(defaults="seeds: []"), ("defaults.seeds: must list at least one seed",)),
    Case(
        "seeds-scalar",
        manifest(defaults="seeds: 7"),
        ("expected a list of seeds or {count: N, base: B}", "hint"),
    ),
    Case("seed-count-zero", manifest(defaults="seeds: {count: 0}"), ("`count` must be at least 1",)),
    Case("seed-range-typo", manifest(defaults="seeds: {count: 2, bse: 5}"), ("did you mean `base`?",)),
    Case(
        "seed-range-overflow",
        manifest(defaults=f"seeds: {{count: 10, base: {2**63 - 5}}}"),
        ("above 2**63 - 1",),
    ),
    Case(
        "huge-seed-count",
        manifest(defaults="seeds: {count: 1000000000000}"),
        ("1,000,000,000,000 jobs, more than the limit of 100,000", "hint: raise it with `--max-jobs N`"),
    ),
    Case(
        "over-max-jobs",
        manifest(top="max_jobs: 3", defaults="seeds: {count: 4}"),
        ("plans 4 jobs, more than the limit of 3",),
    ),
    Case(
        "over-max-jobs-flag",
        VALID,
        ("plans 2 jobs, more than the limit of 1", "hint: raise it with `--max-jobs N`"),
        args=("--max-jobs", "1", "--set", "defaults.seeds=[1,2]"),
    ),
    # Placeholders ------------------------------------------------------------------------------------------
    Case(
        "unknown-placeholder",
        VALID.replace("a {class} in the snow", "a {sujbect} in the snow"),
        ("@:12:9: subjects[0].prompts[0]: unknown placeholder {sujbect}", "hint: known: {subject}, {class}"),
    ),
    Case(
        "class-without-class-noun",
        VALID.replace("    class: dog\n", ""),
        (
            "@:11:9: subjects[0].prompts[0]: uses {class} but the subject has no class noun",
            "hint: add `class:",
        ),
    ),
    Case(
        "unbalanced-brace",
        VALID.replace("a {class} in the snow", "a {class in the snow"),
        ("@:12:9:", "unmatched { at character 3", "hint: write {{ for a literal brace"),
    ),
    # The model ---------------------------------------------------------------------------------------------
    Case(
        "unknown-preset",
        VALID.replace("recipe: tiny", "recipe: tinny"),
        ("@:2:9: recipe: unknown recipe 'tinny'", "hint: known recipes"),
    ),
    Case(
        "missing-preset-file",
        VALID.replace("recipe: tiny", "recipe: presets/mine.yaml"),
        ("@:2:9: recipe: cannot read recipe file", "hint: recipe paths are relative"),
    ),
    Case(
        "preset-is-a-folder",
        VALID.replace("recipe: tiny", "recipe: presets/"),
        ("@:2:9: recipe:",),
        setup=_mkdir("presets"),
    ),
    Case(
        "broken-preset-file",
        VALID.replace("recipe: tiny", "recipe: mine.yaml"),
        ("mine.yaml:1:", "unknown key"),
        setup=_files({"mine.yaml": "name: mine\nmodle: {builtin: tiny}\n"}),
    ),
    Case("no-model", VALID.replace("recipe: tiny\n", ""), ("@:1:1: no model", "hint: add `recipe: tiny`")),
    Case(
        "model-bad-builtin", manifest(top="model: {builtin: huge}"), ("@:3:", "model.builtin: must be one of")
    ),
    Case("model-bad-dtype", manifest(top="model: {dtype: float8}"), ("model.dtype: must be one of",)),
    # The command line ---------------------------------------------------------------------------------------
    Case(
        "set-bad-value",
        VALID,
        ("--set defaults.height=33: defaults.height: must be a multiple of 16",),
        args=("--set", "defaults.height=33"),
    ),
    Case(
        "set-bad-path",
        VALID,
        ("--set subjects.3.name=x:", "index 3 is out of range"),
        args=("--set", "subjects.3.name=x"),
    ),
    Case(
        "set-no-equals",
        VALID,
        ("--set defaults.height:", "expected `dotted.path=value`", "hint:"),
        args=("--set", "defaults.height"),
    ),
    Case(
        "set-bad-yaml",
        VALID,
        ("--set defaults.seeds=[0,:", "not valid YAML", "(hint: close every `[`"),
        args=("--set", "defaults.seeds=[0,"),
    ),
    Case(
        "set-unknown-key",
        VALID,
        ("--set defaults.heigth=64:", "did you mean `height`?"),
        args=("--set", "defaults.heigth=64"),
    ),
    Case(
        "set-python-tag",
        VALID,
        ("--set", "not valid YAML"),
        args=("--set", "defaults.seeds=!!python/object/apply:os.system [touch pwned]"),
    ),
    Case(
        "recipe-flag-unknown",
        VALID,
        ("--recipe nope: recipe: unknown recipe 'nope'",),
        args=("--recipe", "nope"),
    ),
    # The manifest file --------------------------------------------------------------------------------------
    Case("manifest-missing", None, ("@: cannot read the manifest: No such file or directory",)),
    Case(
        "manifest-is-a-directory",
        None,
        ("@: cannot read the manifest", "a folder", "hint: "),
        setup=_mkdir("manifest.yaml"),
    ),
    Case(
        "output-precreated-stays-empty",
        manifest(refs="[refs/missing.png]"),
        ("no such file",),
        precreate_out=True,
    ),
]

if not features.check("webp"):
    CASES = [case for case in CASES if case.id != "truncated-webp"]


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


def problem_lines(err: str) -> list[str]:
    """The problems on stderr, `error: ` removed; checks that every line is an error line, one per
    problem, with a count last when there are several."""
    lines = err.rstrip("\n").split("\n")
    assert all(line.startswith("error: ") for line in lines), err
    if len(lines) > 1:
        assert re.fullmatch(r"error: \d+ problems in .+", lines[-1]), err
        lines = lines[:-1]
    return [line.removeprefix("error: ") for line in lines]


def snapshot(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def run_case(case: Case, folder: Path, squeeze) -> tuple[int, str, str, Path]:
    write(folder, "refs/a.png", png_bytes())
    if case.setup is not None:
        case.setup(folder)
    manifest_path = folder / case.manifest_name
    if case.text is not None:
        write(folder, case.manifest_name, case.text)
    out = folder / "out"
    if case.precreate_out:
        out.mkdir()
    before = snapshot(folder)
    args = list(case.args)
    if args[:2] == ["--out", ""]:
        args = args[2:]
    else:
        args = ["--out", str(out), *args]
    run = squeeze("gen", str(manifest_path), *args)
    assert snapshot(folder) == before, "files were created"
    return run.code, run.out, run.err, manifest_path


def test_bad_input_is_refused_with_one_clear_error_and_nothing_written(case, tmp_path, squeeze):
    folder = tmp_path / "case"
    folder.mkdir()
    code, out, err, manifest_path = run_case(case, folder, squeeze)
    shown = f"stdout:\n{out}\nstderr:\n{err}"
    assert code == 2, shown
    assert "Traceback" not in out + err, shown
    problems = problem_lines(err)
    assert problems, shown
    for line in problems:
        # Each problem names where it is: the manifest, a file beside it (a recipe) or the command-line flag.
        assert line.startswith((str(manifest_path), str(folder), "--set ", "--recipe ")), shown
    text = "\n".join(problems)
    for expected in case.expect:
        assert expected.replace("@", str(manifest_path)) in text, f"{expected!r} not in\n{shown}"
    out_dir = folder / "out"
    assert (not out_dir.exists()) if not case.precreate_out else list(out_dir.iterdir()) == [], shown
    assert not (folder / "pwned").exists() and not Path("pwned").exists()


def test_the_corpus_is_big_enough():
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_manifest(tmp_path, squeeze):
    folder = tmp_path / "case"
    folder.mkdir()
    path = folder / "manifest.yaml"
    path.write_text(VALID)
    path.chmod(0)
    try:
        run = squeeze("gen", str(path), "--out", str(folder / "out"))
    finally:
        path.chmod(0o644)
    err = run.err
    assert run.code == 2
    assert f"{path}: cannot read the manifest: Permission denied" in err
    assert err.rstrip().splitlines()[-1].startswith("error: ")
    assert not (folder / "out").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_reference(tmp_path, squeeze):
    folder = tmp_path / "case"
    folder.mkdir()
    write(folder, "refs/a.png", png_bytes())
    (folder / "refs/a.png").chmod(0)
    path = folder / "manifest.yaml"
    path.write_text(VALID)
    try:
        run = squeeze("gen", str(path), "--out", str(folder / "out"))
    finally:
        (folder / "refs/a.png").chmod(0o644)
    err = run.err
    assert run.code == 2 and "Permission denied" in err
    assert not (folder / "out").exists()


def test_absolute_reference_paths_and_symlinks_outside_the_folder_are_allowed(tmp_path, squeeze):
    """Where the photos live is the user's choice: an absolute path or a symlink leading out is fine."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write(elsewhere, "dog.png", png_bytes())
    folder = tmp_path / "case"
    write(folder, "refs/a.png", png_bytes())
    os.symlink(elsewhere / "dog.png", folder / "refs/link.png")
    text = manifest(refs=f"[{elsewhere / 'dog.png'}, refs/link.png, ../elsewhere/dog.png]")
    write(folder, "manifest.yaml", text)
    run = squeeze("validate", str(folder / "manifest.yaml"))
    assert run.code == 0, run.err
    assert "1 reference," in run.out or "2 references" in run.out


def test_a_valid_manifest_passes_the_same_checks(tmp_path, squeeze):
    """The corpus's base manifest is itself valid: each case fails for its own reason only."""
    folder = tmp_path / "case"
    write(folder, "refs/a.png", png_bytes())
    write(folder, "manifest.yaml", VALID)
    run = squeeze("validate", str(folder / "manifest.yaml"))
    assert run.code == 0, run.err
    for text in (
        manifest(defaults="seeds: [1, 2]"),
        manifest(subject="guidance_scale: 3.0"),
        manifest(top="max_jobs: 5"),
    ):
        write(folder, "manifest.yaml", text)
        run = squeeze("validate", str(folder / "manifest.yaml"))
        assert run.code == 0, run.err


def test_messages_are_one_line_each(tmp_path, squeeze):
    """A problem never spills over several lines, even when the YAML error is a multi-line one."""
    folder = tmp_path / "case"
    write(folder, "refs/a.png", png_bytes())
    write(folder, "manifest.yaml", textwrap.dedent("version: 1\nsubjects:\n  - name: [\n"))
    run = squeeze("gen", str(folder / "manifest.yaml"), "--out", str(folder / "out"))
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'manifest.yaml'}:4:1: ")
