"""Marketplace checks (`squeeze check`, `status --rules`): synthetic images that pass and fail each rule of
the packaged `amazon-main` set, your own rules files, and the exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image, ImageDraw
from support import gen_example_run

from squeeze_cli.manifest.schema import OutputVariant
from squeeze_cli.outputs.checks import load_rules, packaged_rules
from squeeze_cli.outputs.variants import encode_variant

WHITE = (255, 255, 255)


def product_shot(size: tuple[int, int], box: tuple[int, int, int, int], background=WHITE) -> Image.Image:
    """A background with a dark product filling `box` (left, top, right, bottom; right/bottom exclusive)."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=(40, 60, 90))
    return image


# name: (image, the rules it breaks)
SHOTS = {
    "passes": (product_shot((1000, 1000), (50, 50, 950, 950)), []),
    # Fill is measured along the side the product spans most: a tall bottle passes.
    "tall-bottle": (product_shot((1000, 1000), (400, 40, 600, 960)), []),
    "small-product": (product_shot((1000, 1000), (250, 250, 750, 750)), ["min_fill"]),
    "touches-border": (product_shot((1000, 1000), (0, 50, 950, 950)), ["border_background"]),
    "off-white": (
        product_shot((1000, 1000), (50, 50, 950, 950), background=(254, 254, 254)),
        ["border_background"],
    ),
    "too-small": (product_shot((900, 900), (30, 30, 870, 870)), ["min_longest_side"]),
}


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """An output folder as `gen` leaves it: images under a subject and their `ok` lines in the index."""
    out = tmp_path / "out"
    (out / "shop").mkdir(parents=True)
    lines = []
    for index, (name, (image, _)) in enumerate(SHOTS.items()):
        image.save(out / "shop" / f"{name}.png")
        lines.append({"job_id": f"{index:016x}", "status": "ok", "image": f"shop/{name}.png"})
    lines.append({"job_id": "f" * 16, "status": "failed", "error": "out of memory"})
    (out / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return out


def test_amazon_main_is_packaged_with_the_marketplace_numbers() -> None:
    rules = load_rules("amazon-main")
    assert "amazon-main" in packaged_rules()
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"squeeze_cli.outputs" = ["rules/*.yaml"]' in pyproject  # package data: in wheels too
    assert (rules.background, rules.border_background, rules.min_fill, rules.min_longest_side) == (
        WHITE,
        1.0,
        0.85,
        1000,
    )


def test_each_image_passes_or_fails_with_the_numbers_measured(run_folder: Path, squeeze) -> None:
    result = squeeze("check", str(run_folder), "--rules", "amazon-main", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    assert (report["passed"], report["failed"]) == (2, 4)
    by_name = {Path(check["image"]).stem: check for check in report["images"]}
    assert {name: check["failed"] for name, check in by_name.items()} == {
        name: broken for name, (_, broken) in SHOTS.items()
    }
    assert by_name["passes"]["measured"] == {"longest_side": 1000, "border_background": 1.0, "fill": 0.9}
    assert by_name["small-product"]["measured"]["fill"] == 0.5
    assert by_name["touches-border"]["measured"]["border_background"] < 1.0
    assert by_name["too-small"]["measured"]["longest_side"] == 900


def test_text_report_says_pass_or_fail_per_image_and_counts(run_folder: Path, squeeze) -> None:
    result = squeeze("check", str(run_folder), "--rules", "amazon-main")
    lines = result.out.splitlines()
    assert result.code == 1
    assert "pass  shop/passes.png: longest side 1000 px (≥ 1000), border 100.0% background" in lines[1]
    assert any(
        line.startswith("FAIL  shop/small-product.png") and "fill 50.0% (≥ 85%)" in line for line in lines
    )
    assert lines[-1] == "amazon-main on the masters: 2 passed, 4 failed"


def test_all_passing_exits_0_and_your_own_rules_file_is_read(run_folder: Path, write_file, squeeze) -> None:
    rules = write_file("name: lenient\nmin_longest_side: 500\n", name="lenient.yaml")
    result = squeeze("check", str(run_folder), "--rules", str(rules))
    assert result.code == 0, result.out
    assert result.out.splitlines()[-1] == "lenient on the masters: 6 passed, 0 failed"


def test_a_rules_file_named_in_capitals_is_a_file(run_folder: Path, write_file, squeeze, monkeypatch) -> None:
    """`--rules R5.YAML` (no `/`) was looked up as a packaged rule set: 'unknown rule set'."""
    rules = write_file("name: lenient\nmin_longest_side: 500\n", name="R5.YAML")
    monkeypatch.chdir(rules.parent)
    result = squeeze("check", str(run_folder), "--rules", "R5.YAML")
    assert result.code == 0, result.err


def test_a_padded_jpeg_variant_keeps_a_pure_white_border(tmp_path: Path, squeeze) -> None:
    """The path a catalog takes: a master padded onto white, saved as JPEG, passes amazon-main."""
    master = product_shot((512, 640), (20, 20, 492, 620))
    variant = OutputVariant(name="amazon", size="1000x1000", fit="pad", format="jpeg")
    out = tmp_path / "out"
    (out / "shop/variants/amazon").mkdir(parents=True)
    (out / "shop/variants/amazon/000-s0.jpg").write_bytes(encode_variant(master, variant, {}, "none"))
    line = {"job_id": "a" * 16, "status": "ok", "image": "shop/000-s0.png"}
    (out / "index.jsonl").write_text(
        json.dumps({**line, "variants": {"amazon": "shop/variants/amazon/000-s0.jpg"}})
    )
    result = squeeze("check", str(out), "--rules", "amazon-main", "--variant", "amazon", "--json")
    assert result.code == 0, result.out
    assert json.loads(result.out)["images"][0]["measured"]["border_background"] == 1.0


def test_an_image_without_the_variant_fails_as_missing(run_folder: Path, squeeze) -> None:
    lines = [json.loads(line) for line in (run_folder / "index.jsonl").read_text().splitlines()]
    lines[-2]["variants"] = {"amazon": lines[-2]["image"]}  # one image has it (its master stands in)
    (run_folder / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = squeeze("check", str(run_folder), "--rules", "amazon-main", "--variant", "amazon", "--json")
    assert result.code == 1
    report = json.loads(result.out)
    missing = [check for check in report["images"] if check.get("error", "").startswith("missing")]
    assert len(missing) == 5 and missing[0]["error"] == "missing: it has no variant 'amazon'"


def test_a_deleted_file_fails_as_missing_and_says_how_to_get_it_back(run_folder: Path, squeeze) -> None:
    """A deleted image (or variant file) failed as "cannot be read: No such file or directory"."""
    (run_folder / "shop" / "passes.png").unlink()
    result = squeeze("check", str(run_folder), "--rules", "amazon-main")
    assert result.code == 1
    said = "FAIL  shop/passes.png: missing: the file is gone (`squeeze gen` on the run makes it again)"
    assert said in result.out


@pytest.mark.parametrize("variant", ["amazon", ""])
def test_a_variant_no_image_has_is_a_usage_error(run_folder: Path, squeeze, variant: str) -> None:
    """A misspelt `--variant` (or an empty one) failed every image as "missing", exit 1, and no hint."""
    result = squeeze("check", str(run_folder), "--rules", "amazon-main", "--variant", variant)
    assert result.code == 2
    assert f"no image in {run_folder} has a variant {variant!r} (hint: the run made none" in result.err


FEED_RUN = """\
version: 1
recipe: tiny
output: {grids: false, contact_sheet: false, variants: [{name: thumb, size: 40x40, format: png}]}
defaults: {height: 32, width: 32, num_inference_steps: 2, seeds: [0]}
subjects_from:
  path: products.csv
  name: sku
  references: images
  scenes: [a product on a table]
"""


def test_a_product_removed_from_the_feed_is_not_checked(tmp_path: Path, squeeze) -> None:
    """A product dropped from the feed left its images in OUT (stale, until `--prune`), and `check` and
    `status --rules` still checked them: with a variant added since, it failed as `missing` every night."""
    (tmp_path / "products.csv").write_text("sku,images\nTEA,images/teapot/00.jpg\nCAN,images/can/00.jpg\n")
    out = gen_example_run(
        tmp_path, squeeze, FEED_RUN.replace(", variants: [{name: thumb, size: 40x40, format: png}]", "")
    )
    (tmp_path / "products.csv").write_text("sku,images\nTEA,images/teapot/00.jpg\n")
    (tmp_path / "m.yaml").write_text(FEED_RUN)  # and a variant is added
    assert squeeze("gen", str(tmp_path / "m.yaml"), "--out", str(out), "--quiet").code == 0
    assert (out / "CAN" / "000-s0.png").is_file()  # still there, not the plan's

    rules = tmp_path / "lenient.yaml"
    rules.write_text("name: lenient\nmin_longest_side: 16\n")
    checked = squeeze("check", str(out), "--rules", str(rules), "--variant", "thumb", "--json")
    assert checked.code == 0, checked.out
    report = json.loads(checked.out)
    assert [image["image"] for image in report["images"]] == ["TEA/variants/thumb/000-s0.png"]
    status = squeeze("status", str(out), "--json", "--rules", str(rules), "--variant", "thumb")
    assert status.code == 0, status.out
    assert json.loads(status.out)["checks"] == {key: value for key, value in report.items() if key != "ok"}
    text = squeeze("status", str(out), "--rules", str(rules), "--variant", "thumb").out
    assert text.splitlines()[-1] == "lenient on variant 'thumb': 1 passed, 0 failed"


def test_a_variant_the_run_has_not_made_yet_fails_its_images_not_the_command(tmp_path: Path, squeeze) -> None:
    """`gen` makes the variants after the images: a monitor's `check --variant` (or `status --rules
    --variant`) while the night's run renders got exit 2, "the run made none (`output.variants`)"."""
    (tmp_path / "products.csv").write_text("sku,images\nTEA,images/teapot/00.jpg\n")
    out = gen_example_run(
        tmp_path,
        squeeze,
        FEED_RUN.replace("variants: [{name: thumb, size: 40x40, format: png}]", "variants: []"),
    )
    resolved = out / "manifest.resolved.yaml"  # as the run that makes them left it, before it makes them
    resolved.write_text(
        resolved.read_text().replace("variants: []", "variants: [{name: thumb, size: 40x40}]")
    )
    for command in ("check", "status"):
        result = squeeze(command, str(out), "--rules", "amazon-main", "--variant", "thumb")
        assert result.code == 1, result.err
        assert result.out.splitlines()[-1] == "amazon-main on variant 'thumb': 0 passed, 1 failed"
    assert squeeze("check", str(out), "--rules", "amazon-main", "--variant", "thum").code == 2


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ("nope", "error: unknown rule set 'nope' (hint: known rule sets: amazon-main"),
        (
            "missing.yaml",
            "error: cannot read rules file 'missing.yaml': No such file or directory "
            "(hint: a path is relative to the current folder; the packaged rule sets: amazon-main)",
        ),
    ],
)
def test_unknown_rules_exit_2(run_folder: Path, squeeze, rules: str, message: str) -> None:
    result = squeeze("check", str(run_folder), "--rules", rules)
    assert result.code == 2 and result.err.startswith(message)
    as_json = squeeze("check", str(run_folder), "--rules", rules, "--json")
    document = json.loads(as_json.out)
    assert as_json.code == 2 and document["ok"] is False
    assert message.startswith(f"error: {document['problems'][0]['message']}")


def test_a_rules_file_with_problems_is_located(run_folder: Path, write_file, squeeze) -> None:
    rules = write_file("name: bad\nmin_fill: 1.5\nborder_colour: white\n", name="bad.yaml")
    result = squeeze("check", str(run_folder), "--rules", str(rules))
    assert result.code == 2
    assert "bad.yaml:2:" in result.err and "bad.yaml:3:" in result.err


def test_a_rules_file_takes_values_as_strictly_as_a_manifest(run_folder: Path, write_file, squeeze) -> None:
    """`yes` was read as 1.0 and "0.5" as 0.5; a name with a newline printed lines of its own; a colour one
    item short said the key was missing."""
    text = 'name: "a\\nFAIL fake"\nborder_background: yes\nmin_fill: "0.5"\nbackground: [255, 255]\n'
    result = squeeze("check", str(run_folder), "--rules", str(write_file(text, name="loose.yaml")))
    assert result.code == 2
    assert "loose.yaml:1:7: name: must be one line of printable characters" in result.err
    assert "loose.yaml:2:20: border_background: expected a number, got True" in result.err
    assert "loose.yaml:3:11: min_fill: expected a number, got '0.5'" in result.err
    assert "loose.yaml:4:13: background: too few items: item 3 is missing" in result.err


def test_an_empty_rules_file_gets_a_rules_hint_not_a_manifests(run_folder: Path, write_file, squeeze) -> None:
    result = squeeze("check", str(run_folder), "--rules", str(write_file("", name="empty.yaml")))
    assert result.code == 2
    assert "empty.yaml: the file is empty (hint: a rules file needs at least a `name`" in result.err
    assert "manifest" not in result.err


def test_a_folder_without_an_index_exits_2(tmp_path: Path, squeeze) -> None:
    result = squeeze("check", str(tmp_path), "--rules", "amazon-main")
    assert result.code == 2 and "has no index.jsonl" in result.err


def test_the_folder_of_several_recipes_hints_at_one_of_its_runs(run_folder: Path, squeeze) -> None:
    """`gen --recipe A,B` writes OUT/A/ and OUT/B/: `check OUT` names one of them to give instead."""
    (run_folder / "manifest.resolved.yaml").touch()
    result = squeeze("check", str(run_folder.parent), "--rules", "amazon-main")
    assert result.code == 2
    assert f"(hint: give one of the runs in it, e.g. {run_folder})" in result.err


def test_a_damaged_index_line_or_a_fifo_fails_that_image_only(run_folder: Path, squeeze) -> None:
    import os

    os.mkfifo(run_folder / "shop" / "fifo.png")
    (run_folder / "shop" / "garbage.png").write_bytes(b"not an image at all")
    lines = [
        {
            "job_id": "1" * 16,
            "status": "ok",
            "image": "shop/passes.png",
            "variants": {"v": "../../outside.jpg"},
        },
        {"job_id": "2" * 16, "status": "ok", "image": "shop/fifo.png", "variants": {"v": "shop/fifo.png"}},
        {
            "job_id": "3" * 16,
            "status": "ok",
            "image": "shop/garbage.png",
            "variants": {"v": "shop/garbage.png"},
        },
    ]
    (run_folder / "index.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = squeeze("check", str(run_folder), "--rules", "amazon-main", "--variant", "v", "--json")
    assert result.code == 1
    errors = {check["image"]: check["error"] for check in json.loads(result.out)["images"]}
    assert "outside the output directory" in errors["../../outside.jpg"]
    remake = "remove it, and `squeeze gen` on the run makes it again"
    assert errors["shop/fifo.png"] == f"cannot be read: not a regular file (a FIFO (named pipe)); {remake}"
    assert errors["shop/garbage.png"] == f"cannot be read: not an image (PIL cannot identify it); {remake}"
