"""`squeeze train` configs and data: presets validate, bad configs and bad data get located one-line errors,
all at once, before any model loads, and nothing is written."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from squeeze_cli.errors import ManifestError
from squeeze_cli.train.config import load_config, presets
from squeeze_cli.train.data import BatchSchedule, load_data, load_jsonl_data

TINY_DATA = Path(__file__).resolve().parents[1] / "squeeze_cli" / "train" / "presets" / "tiny-data"


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_packaged_preset_validates(name: str) -> None:
    loaded = load_config(name)
    assert loaded.config.stages.stage1.steps > 0
    assert loaded.config.version == 1


def test_paper_preset_has_the_papers_schedule() -> None:
    config = load_config("paper").config
    assert (config.stages.stage1.steps, config.stages.stage2.steps) == (25_000, 10_000)
    assert config.lora.rank == 512
    assert config.data.layout == "subjects200k"
    # Per-group learning rates, recorded per stage.
    assert set(config.stages.stage2.learning_rates) == {"aggregator", "lora"}


def test_tiny_preset_data_loads() -> None:
    data = load_data(load_config("tiny"))
    assert len(data) == 4
    sample = data.load(0)
    assert sample.instruction and sample.references and sample.target.size == (64, 64)


def _config(write_file, body: str, name: str = "train.yaml") -> Path:
    return write_file(
        f"""
        version: 1
        recipe: tiny
        output_dir: out
        data: {{format: jsonl, path: {TINY_DATA / "samples.jsonl"}}}
        {body}
        """,
        name,
    )


def test_every_config_problem_is_reported_at_once_with_its_line(write_file) -> None:
    path = _config(
        write_file,
        """stages:
          stage1: {steps: 5, train: [aggregator, lora], learning_rates: {aggregator: 1.0e-4}}
          stage2: {steps: 2, warmup_step: 3}
        training:
          mixed_precision: fp8
          dropout: {text: 0.6, references: 0.6}
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_config(path)
    messages = [str(p) for p in info.value.problems]
    text = "\n".join(messages)
    assert len(messages) == 4, text
    assert "stages.stage1: no learning rate for trained group(s) lora" in text
    assert "stages.stage2.warmup_step: unknown key `warmup_step` (hint: did you mean `warmup_steps`?)" in text
    assert "training.mixed_precision: must be one of" in text
    assert "training.dropout: `text` + `references` + `both` must be at most 1" in text
    # Located at the line of the offending key (file:line:column).
    assert any(m.startswith(f"{path.name}:7:") or f"{path}:7:" in m for m in messages), text


def test_missing_data_file_and_validation_image_are_located(write_file) -> None:
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data: {format: jsonl, path: ./nowhere.jsonl}
        stages: {stage1: {steps: 1}, stage2: {steps: 0}}
        validation:
          prompts: [{references: [./missing.png], instruction: a toy}]
        """
    )
    with pytest.raises(ManifestError) as info:
        load_config(path)
    text = "\n".join(str(p) for p in info.value.problems)
    assert ":4:" in text and "data.path: no such file or folder" in text
    assert "validation.prompts[0].references[0]: no such image" in text


def test_unknown_recipe_is_located_in_the_config(write_file) -> None:
    path = write_file(
        f"""
        version: 1
        recipe: no-such-recipe
        output_dir: out
        data: {{format: jsonl, path: {TINY_DATA / "samples.jsonl"}}}
        stages: {{stage1: {{steps: 1}}, stage2: {{steps: 1}}}}
        """
    )
    with pytest.raises(
        ManifestError, match=r":2:9: recipe: unknown recipe 'no-such-recipe' \(hint: known recipes"
    ):
        load_config(path)


def test_json_folder_form(tmp_path: Path, make_image) -> None:
    make_image("samples/ref.png")
    make_image("samples/target.png", size=(48, 32))
    record = {"id": "s1", "references": ["ref.png"], "instruction": "a toy", "target": "target.png"}
    (tmp_path / "samples" / "s1.json").write_text(json.dumps(record))
    (tmp_path / "samples" / "s2.json").write_text(json.dumps({**record, "id": "s2", "target": "nope.png"}))
    with pytest.raises(ManifestError, match=r"s2.json: target: no such image"):
        load_jsonl_data(tmp_path / "samples")
    (tmp_path / "samples" / "s2.json").unlink()
    data = load_jsonl_data(tmp_path / "samples")
    assert data.ids == ["s1"] and data.size(0) == (48, 32)


def test_resume_from_a_folder_that_is_no_checkpoint_is_refused(squeeze, tmp_path: Path) -> None:
    result = squeeze("train", "tiny", "--set", f"output_dir={tmp_path / 'run'}", "--resume", str(tmp_path))
    assert result.code == 2
    assert "is not a squeeze checkpoint" in result.err
    assert not (tmp_path / "run").exists()


def _tree(folder: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in folder.rglob("*")}


@pytest.mark.parametrize("resume", [[], ["--resume", "latest"]], ids=["new", "resume-latest"])
def test_an_existing_folder_that_is_no_training_run_is_refused_untouched(
    squeeze, tmp_path: Path, resume: list[str]
) -> None:
    """`output_dir` naming a user's folder: refused before anything is written or deleted (the run's stage
    exports and its clean-up of `.partial-*` used to delete these)."""
    mine = tmp_path / "project"
    (mine / "stage1").mkdir(parents=True)
    (mine / "stage1" / "notes.txt").write_text("mine")
    (mine / "stage2").mkdir()
    (mine / "stage2" / "thesis.tex").write_text("mine")
    (mine / ".partial-drafts").mkdir()
    (mine / "checkpoints" / ".partial-x").mkdir(parents=True)
    before = _tree(mine)
    result = squeeze("train", "tiny", "--no-progress", "--set", f"output_dir={mine}", *resume)
    assert result.code == 2
    assert f"output_dir {mine} is not empty and is not a squeeze training run (it has no training.json)" in (
        result.err
    )
    assert len([line for line in result.err.splitlines() if line.startswith("error")]) == 1
    assert _tree(mine) == before


def test_a_run_killed_while_writing_its_first_record_is_still_its_own(tmp_path: Path) -> None:
    """Only the temporary file of `training.json` of a process that is gone: the folder is the killed run's,
    not a user's, and the next run may start there; a user's file beside it still refuses the folder."""
    from squeeze_cli.train.checkpoints import RunError, check_output_dir

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    leftover = run / f".training.json.{dead.stdout.strip()}.tmp"
    leftover.write_text("{")
    check_output_dir(run)
    assert not leftover.exists()
    leftover.write_text("{")
    (run / "notes.txt").write_text("mine")
    with pytest.raises(RunError, match="is not empty and is not a squeeze training run"):
        check_output_dir(run)
    assert (run / "notes.txt").read_text() == "mine"


def test_an_output_dir_that_is_a_file_is_refused(squeeze, tmp_path: Path) -> None:
    (tmp_path / "run").write_text("mine")
    result = squeeze("train", "tiny", "--no-progress", "--set", f"output_dir={tmp_path / 'run'}")
    assert result.code == 2 and "is not a folder" in result.err
    assert (tmp_path / "run").read_text() == "mine"


def test_a_config_that_cannot_be_read_is_called_a_training_config(squeeze, tmp_path: Path) -> None:
    """Not "the manifest", with the manifest's hints: a missing one names the packaged presets."""
    missing = squeeze("train", str(tmp_path / "my-train.yaml"))
    assert missing.code == 2, missing.err
    assert "my-train.yaml: cannot read the training config: No such file or directory" in missing.err
    assert "(hint: give a training config's .yaml file, or a packaged preset: paper, tiny)" in missing.err
    folder = squeeze("train", str(tmp_path))
    assert folder.code == 2 and "(hint: give the path of the training config's .yaml file" in folder.err
    assert "manifest" not in missing.err + folder.err


def test_help_lists_train(squeeze) -> None:
    assert "train" in squeeze("--help").out
    help_text = squeeze("train", "--help").out
    assert "--resume" in help_text and "--dry-run" in help_text


def test_zero_steps_in_both_stages_is_refused(write_file) -> None:
    path = _config(write_file, "stages: {stage1: {steps: 0}, stage2: {steps: 0}}")
    with pytest.raises(ManifestError, match="nothing to train"):
        load_config(path)


def test_seeds_torch_cannot_take_are_located(write_file) -> None:
    # Past 2**64 torch raises "Overflow when unpacking long long": for `validation.seed` only when the
    # first grid is drawn, a traceback after a whole stage of training.
    huge = 2**65
    path = _config(write_file, "stages: {stage1: {steps: 1}, stage2: {steps: 1}}")
    path.write_text(path.read_text() + f"seed: {huge}\nvalidation: {{seed: {huge}}}\n")
    with pytest.raises(ManifestError) as caught:
        load_config(path)
    paths = sorted(problem.field for problem in caught.value.problems)
    assert paths == ["seed", "validation.seed"], caught.value.problems
    assert all("2**63 - 1" in problem.message for problem in caught.value.problems)


def test_cli_bad_config_exits_2_and_writes_nothing(squeeze, write_file, tmp_path: Path) -> None:
    path = _config(write_file, "stages: {stage1: {steps: 1}, stage2: {steps: 1}, bogus: 1}")
    result = squeeze("train", str(path))
    assert result.code == 2
    assert "stages.bogus: unknown key `bogus`" in result.err
    assert not (tmp_path / "out").exists()


# Data --------------------------------------------------------------------------------------------------


def test_bad_jsonl_lines_are_all_reported_with_line_numbers(tmp_path: Path, make_image) -> None:
    make_image("ref.png")
    make_image("target.png")
    lines = [
        {"references": ["ref.png"], "instruction": "fine", "target": "target.png"},
        "not json",
        {"references": ["gone.png"], "instruction": "x", "target": "target.png"},
        {"references": [], "instruction": "", "target": "target.png", "extra": 1},
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    with pytest.raises(ManifestError) as info:
        load_jsonl_data(path)
    text = "\n".join(str(p) for p in info.value.problems)
    assert f"{path}:2:1: not valid JSON" in text
    assert f"{path}:3: references[0]: no such image" in text
    assert f"{path}:4: extra: unknown key `extra`" in text
    assert f"{path}:4: references: expected a non-empty list of image paths" in text
    assert f"{path}:4: instruction: expected a non-empty string" in text


def test_truncated_target_image_is_refused(tmp_path: Path, make_image) -> None:
    make_image("ref.png")
    broken = make_image("target.png")
    broken.write_bytes(broken.read_bytes()[:-12])  # IEND gone
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps({"references": ["ref.png"], "instruction": "x", "target": "target.png"}) + "\n"
    )
    with pytest.raises(ManifestError, match=r"data.jsonl:1: target: .*target.png: the file is truncated"):
        load_jsonl_data(path)


def test_cli_bad_data_exits_2_before_any_model_and_writes_nothing(
    squeeze, write_file, tmp_path: Path
) -> None:
    (tmp_path / "data.jsonl").write_text('{"references": ["a.png"], "instruction": "x", "target": "b.png"}\n')
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data: {format: jsonl, path: data.jsonl}
        stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        """
    )
    result = squeeze("train", str(path))
    assert result.code == 2
    assert "data.jsonl:1: references[0]: no such image" in result.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not an image", "not a readable image"),
        ("truncated", "the file is truncated"),
        (b"", "the file is empty"),
    ],
)
def test_validation_references_are_checked_like_gens_before_training(
    write_file, tmp_path: Path, make_image, content, reason: str
) -> None:
    """A bad validation reference used to train all of stage 1 before failing in the first grid."""
    bad = make_image("val/bad.png")
    bad.write_bytes(bad.read_bytes()[:-12] if content == "truncated" else content)
    path = _config(
        write_file,
        """stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        validation:
          prompts: [{references: [val/bad.png], instruction: a toy}]
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_config(path)
    [problem] = info.value.problems
    assert f"validation.prompts[0].references[0]: {bad}: {reason}" in str(problem)
    assert problem.line == 7 and problem.hint  # located, with gen's hint


def _jsonl(tmp_path: Path, make_image, **record: object) -> Path:
    make_image("ref.png")
    make_image("target.png")
    path = tmp_path / "data.jsonl"
    line = {"references": ["ref.png"], "instruction": "x", "target": "target.png", **record}
    path.write_text(json.dumps(line) + "\n")
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"target": "a\u0000b.png"}, "target: the path 'a\\x00b.png' contains a NUL character"),
        ({"references": ["~nosuchuser/x.png"]}, "references[0]: the path '~nosuchuser/x.png' starts with"),
    ],
    ids=["nul", "unknown-user"],
)
def test_unusable_image_paths_in_the_data_are_located(tmp_path: Path, make_image, record, message) -> None:
    path = _jsonl(tmp_path, make_image, **record)
    with pytest.raises(ManifestError, match=re.escape(f"data.jsonl:1: {message}")):
        load_jsonl_data(path)


def test_deeply_nested_json_is_located(tmp_path: Path, make_image) -> None:
    path = _jsonl(tmp_path, make_image)
    path.write_text(path.read_text() + "[" * 100000 + "\n")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "deep.json").write_text("[" * 100000)
    with pytest.raises(ManifestError, match=r"data.jsonl:2: not valid JSON: nested too deeply"):
        load_jsonl_data(path)
    with pytest.raises(ManifestError, match=r"deep.json: not valid JSON: nested too deeply"):
        load_jsonl_data(tmp_path / "samples")


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder-fifo"])
def test_a_data_file_that_is_no_regular_file_is_refused_without_reading(tmp_path: Path, kind: str) -> None:
    """A FIFO used to hang the check and /dev/zero to read until memory ran out."""
    import os

    if kind == "dev-zero":
        path = Path("/dev/zero")
    elif kind == "fifo":
        path = tmp_path / "data.jsonl"
        os.mkfifo(path)
    else:
        path = tmp_path / "samples"
        path.mkdir()
        os.mkfifo(path / "a.json")
    with pytest.raises(ManifestError, match=r"cannot read (the data file|it): not a regular file"):
        load_jsonl_data(path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("~nosuchuser/a.jsonl", "data.path: the path '~nosuchuser/a.jsonl' starts with ~nosuchuser"),
        ('"./a\\0b.jsonl"', "data.path: the path './a\\x00b.jsonl' contains a NUL character"),
    ],
    ids=["unknown-user", "nul"],
)
def test_unusable_config_paths_are_located(write_file, value: str, message: str) -> None:
    path = write_file(
        f"""
        version: 1
        recipe: tiny
        output_dir: out
        data: {{format: jsonl, path: {value}}}
        stages: {{stage1: {{steps: 1}}, stage2: {{steps: 1}}}}
        """
    )
    with pytest.raises(ManifestError, match=r":4:\d+: " + re.escape(message)):
        load_config(path)


def _pair_image(side: int, padding: int, left: tuple, right: tuple) -> Image.Image:
    image = Image.new("RGB", (2 * side + 4 * padding, side + 2 * padding), (255, 255, 255))
    image.paste(Image.new("RGB", (side, side), left), (padding, padding))
    image.paste(Image.new("RGB", (side, side), right), (side + 3 * padding, padding))
    return image


def _subjects200k_parquet(path: Path, padding: int = 8, images: list[Image.Image] | None = None) -> Path:
    """A tiny parquet in the layout of Yuanshi/Subjects200K (image pair, description, quality scores)."""
    import datasets

    rows = {
        "image": images
        or [
            _pair_image(32, padding, (255, 0, 0), (0, 0, 255)),
            _pair_image(32, padding, (0, 255, 0), (9, 9, 9)),
        ],
        "collection": ["collection_2", "collection_2"],
        "quality_assessment": [
            {"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5},
            {"compositeStructure": 5, "objectConsistency": 3, "imageQuality": 5},
        ],
        "description": [
            {
                "item": "mug",
                "description_0": "a mug on a desk",
                "description_1": "a mug in the snow",
                "category": "Kitchen",
            },
            {
                "item": "lamp",
                "description_0": "a lamp",
                "description_1": "a lamp outside",
                "category": "Home",
            },
        ],
    }
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "collection": datasets.Value("string"),
            "quality_assessment": {k: datasets.Value("int64") for k in rows["quality_assessment"][0]},
            "description": {k: datasets.Value("string") for k in rows["description"][0]},
        }
    )
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path


def test_subjects200k_rows_split_into_reference_and_target_and_filter_by_quality(
    write_file, tmp_path
) -> None:
    _subjects200k_parquet(tmp_path / "subjects.parquet")
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data: {format: hf, path: subjects.parquet, layout: subjects200k, filter: {min_quality: 5}}
        stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        """
    )
    data = load_data(load_config(path))
    assert len(data) == 2  # the second row fails the filter; the first gives two samples
    left_target, right_target = data.load(0), data.load(1)
    assert left_target.target.size == (32, 32) and left_target.references[0].size == (32, 32)
    assert left_target.target.getpixel((16, 16)) == (255, 0, 0)
    assert left_target.references[0].getpixel((16, 16)) == (0, 0, 255)
    assert left_target.instruction == "a mug on a desk"
    assert right_target.target.getpixel((16, 16)) == (0, 0, 255)
    assert right_target.instruction == "a mug in the snow"
    assert data.ids == ["row0-left", "row0-right"]


def test_subjects200k_halves_are_the_two_panels_without_their_padding(write_file, tmp_path) -> None:
    """A row is two 528x528 panels side by side, each a 512x512 image framed by 8 px (1056 = 2 x (512 + 2 x
    8)): the right image starts at 528 + 8 = 536. The dataset authors' loader (OminiControl,
    `image_size + 2 * padding` = 528) starts at the right panel's frame, so its right image has 8 px of
    padding on its left and lacks the panel's last 8 columns; squeeze crops the panels exactly."""
    import numpy as np

    side, padding = 512, 8
    noise = np.random.default_rng(0).integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    panels = [Image.fromarray(n) for n in noise]
    row = Image.new("RGB", (2 * side + 4 * padding, side + 2 * padding), (255, 255, 255))
    for index, panel in enumerate(panels):  # each panel framed on all four sides
        row.paste(panel, (index * (side + 2 * padding) + padding, padding))
    assert row.size == (1056, 528)  # the published rows' size
    _subjects200k_parquet(tmp_path / "subjects.parquet", images=[row, row])
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data: {format: hf, path: subjects.parquet, layout: subjects200k, filter: {min_quality: 5}}
        stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        """
    )
    sample = load_data(load_config(path)).load(0)  # the left half as target, the right as reference
    assert np.array_equal(np.asarray(sample.target), noise[0])
    assert np.array_equal(np.asarray(sample.references[0]), noise[1])
    authors = np.asarray(row.crop((side + 2 * padding, padding, 2 * side + 2 * padding, side + padding)))
    assert (authors[:, :padding] == 255).all()  # the frame, where the panel should start
    assert np.array_equal(authors[:, padding:], noise[1][:, :-padding])


def test_subjects200k_padding_is_configurable_and_bad_geometry_is_caught(write_file, tmp_path) -> None:
    _subjects200k_parquet(tmp_path / "subjects.parquet", padding=0)  # the 1024x512 variant: no padding
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data: {format: hf, path: subjects.parquet, layout: subjects200k, padding: 0}
        stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        """
    )
    sample = load_data(load_config(path)).load(0)
    assert sample.target.size == (32, 32) and sample.target.getpixel((0, 0)) == (255, 0, 0)
    assert sample.references[0].getpixel((0, 0)) == (0, 0, 255)

    import datasets

    datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (70, 32))],
            "description": ["x"],
            "quality_assessment": [{"compositeStructure": 5, "objectConsistency": 5, "imageQuality": 5}],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "description": datasets.Value("string"),
                "quality_assessment": {
                    k: datasets.Value("int64")
                    for k in ("compositeStructure", "objectConsistency", "imageQuality")
                },
            }
        ),
    ).to_parquet(str(tmp_path / "subjects.parquet"))
    with pytest.raises(ManifestError, match="data.padding: row 0: a 70x32 image is not two 32-px halves"):
        load_data(load_config(path))


def test_hf_column_mapping_and_missing_column(write_file, tmp_path) -> None:
    import datasets

    red = Image.new("RGB", (32, 32), (255, 0, 0))
    datasets.Dataset.from_dict(
        {"refs": [[red, red]], "prompt": ["two reds"], "image": [red], "key": ["a1"]},
        features=datasets.Features(
            {
                "refs": datasets.Sequence(datasets.Image()),
                "prompt": datasets.Value("string"),
                "image": datasets.Image(),
                "key": datasets.Value("string"),
            }
        ),
    ).to_parquet(str(tmp_path / "rows.parquet"))
    path = write_file(
        """
        version: 1
        recipe: tiny
        output_dir: out
        data:
          format: hf
          path: rows.parquet
          columns: {references: refs, instruction: prompt, target: image, id: key}
        stages: {stage1: {steps: 1}, stage2: {steps: 1}}
        """
    )
    data = load_data(load_config(path))
    sample = data.load(0)
    assert (data.ids, len(sample.references), sample.instruction) == (["a1"], 2, "two reds")
    with pytest.raises(ManifestError, match=r"data.columns.target: the dataset has no column `picture`"):
        load_data(load_config(path, ["data.columns.target=picture"]))
    with pytest.raises(ManifestError, match=r"data.columns: row 0 does not decode as images"):
        load_data(load_config(path, ["data.columns.target=prompt"]))


def test_batch_order_is_a_function_of_seed_and_position() -> None:
    data = load_data(load_config("tiny"))
    first = BatchSchedule(data, [(64, 64)], batch_size=3, seed=7)
    again = BatchSchedule(data, [(64, 64)], batch_size=3, seed=7)
    assert [again.batch(k) for k in range(9)] == [first.batch(k) for k in range(9)]
    # An epoch covers every sample once (short last batch kept).
    epoch = sorted(i for k in range(first.batches_per_epoch) for i in first.batch(k)[0])
    assert epoch == list(range(len(data)))


def test_the_annotated_config_in_the_docs_is_valid(tmp_path: Path) -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text(encoding="utf-8")
    section = docs.split("## A complete config, annotated", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "train.yaml"
    path.write_text(block, encoding="utf-8")
    # Its validation images are examples; everything else validates as written.
    loaded = load_config(path, ["validation.prompts=[]"])
    assert loaded.config.stages.stage1.steps == 25_000 and loaded.config.lora.rank == 512
    with pytest.raises(ManifestError, match="validation.prompts\\[0\\].references\\[0\\]: no such image"):
        load_config(path)
