"""Stale outputs (docs/outputs.md, "Stale images"): images of jobs the current plan does not have are
reported by `status` and `gen`, moved to `OUT/.stale/<UTC time>/` by `gen --prune` (and only when the
plan needs their name without it), never deleted, and never keep a name the plan gives another prompt."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_outputs import make_job, make_record, solid
from test_resume import HEAD, strict_loads, subject

from squeeze_cli import outputs
from squeeze_cli.errors import EXIT_OK
from squeeze_cli.outputs import layout, records
from squeeze_cli.outputs.stale import find_stale, move_stale, remove_emptied_folders


@pytest.fixture
def gen(make_project, squeeze):
    """`gen(manifest text, *flags)`: writes it as m.yaml, runs `squeeze gen` into OUT; returns the run."""
    project = make_project()

    def go(text: str, *flags: str):
        (project / "m.yaml").write_text(text)
        result = squeeze("gen", str(project / "m.yaml"), "--out", str(project / "out"), *flags)
        assert result.code == EXIT_OK, result.err
        return result

    go.out = project / "out"  # type: ignore[attr-defined]
    go.project = project  # type: ignore[attr-defined]
    return go


def stale_files(out: Path) -> list[str]:
    """Every file under `OUT/.stale`, as `<subject>/<name>` (the time folder left out)."""
    return sorted(
        str(path.relative_to(path.parents[1])) for path in (out / ".stale").glob("*/*/*") if path.is_file()
    )


def names_match_the_plan(out: Path, jobs) -> None:
    """Every planned name holds its job's prompt, in the sidecar and in the PNG's own record."""
    for job in jobs:
        sidecar = strict_loads(layout.sidecar_path(out, job).read_text())
        assert (sidecar["job_id"], sidecar["prompt"]) == (job.job_id, job.prompt)
        assert records.read_png_record(layout.image_path(out, job))["job_id"] == job.job_id


def test_status_and_gen_report_the_images_the_plan_does_not_have(gen, squeeze, plan_of) -> None:
    # The new-user D1 reproduction: a prompt inserted first, seed 8 replaced by seed 9.
    gen(HEAD.format(seeds="[7, 8]") + subject("dog", ["a {class} in the snow", "a {class} in a hat"]), "-q")
    edited = HEAD.format(seeds="[7, 9]") + subject(
        "dog", ["a {class} on a skateboard", "a {class} in the snow", "a {class} in a hat"]
    )
    result = gen(edited)
    assert "stale: 2 images in" in result.err  # 000-s8 and 001-s8: seed 8 is no longer planned
    summary = json.loads((gen.out / "run.json").read_text())
    assert summary["stale"] == {"moved": 0, "moved_to": None, "left": 2}
    jobs = plan_of(gen.project / "m.yaml")
    names_match_the_plan(gen.out, jobs)

    status = squeeze("status", str(gen.out))
    assert status.code == 0, status.err  # complete: every planned image is done
    listed = "stale     2 images of jobs this manifest does not plan: dog/000-s8.png, dog/001-s8.png"
    assert listed in status.out
    assert "--prune" in status.out
    as_json = json.loads(squeeze("status", str(gen.out), "--json").out)
    assert as_json["stale"]["count"] == 2
    assert [image["image"] for image in as_json["stale"]["images"]] == ["dog/000-s8.png", "dog/001-s8.png"]
    planned = {job.job_id for job in jobs}
    assert not planned & {image["job_id"] for image in as_json["stale"]["images"]}
    assert not (gen.out / ".stale").exists()  # nothing moved without --prune, nothing deleted
    assert (gen.out / "dog" / "001-s8.png").is_file()
    dry = ("gen", str(gen.project / "m.yaml"), "--out", str(gen.out), "--dry-run")
    assert "  stale: 2 images of jobs this manifest does not plan" in squeeze(*dry).out
    assert json.loads(squeeze(*dry, "--json").out)["stale"] == 2


def test_a_stale_image_never_keeps_a_name_the_plan_gives_another_prompt(gen, plan_of) -> None:
    gen(HEAD.format(seeds="[0]") + subject("dog", ["a {class} on a rug", "a {class} in a box"]), "-q")
    rug = (gen.out / "dog" / "000-s0.png").read_bytes()
    # The rug prompt removed: the box image moves to 000-s0, the rug image is in its way.
    result = gen(HEAD.format(seeds="[0]") + subject("dog", ["a {class} in a box", "a {class} in a hat"]))
    jobs = plan_of(gen.project / "m.yaml")
    names_match_the_plan(gen.out, jobs)
    assert stale_files(gen.out) == ["dog/000-s0.json", "dog/000-s0.png"]
    (moved,) = (gen.out / ".stale").glob("*/dog/000-s0.png")
    assert moved.read_bytes() == rug  # moved, not deleted
    assert strict_loads(moved.with_suffix(".json").read_text())["prompt"] == "a dog on a rug"
    summary = json.loads((gen.out / "run.json").read_text())
    assert summary["stale"]["moved"] == 1 and summary["stale"]["left"] == 0
    assert summary["stale"]["moved_to"].startswith(".stale/")
    assert "moved 1 stale images to .stale/" in result.err
    index = [strict_loads(line) for line in (gen.out / "index.jsonl").read_text().splitlines()]
    assert sorted(line["job_id"] for line in index) == sorted(job.job_id for job in jobs)


def test_prune_moves_stale_images_sidecars_and_views_and_rewrites_the_index(gen, squeeze, plan_of) -> None:
    first = (
        HEAD.format(seeds="[0, 1]")
        + subject("dog", ["a {class}", "a {class} on a rug"])
        + subject("cat", ["a {class} on a sofa"])
    )
    gen(first, "-q")
    before = {str(path.relative_to(gen.out)): path.read_bytes() for path in gen.out.glob("*/*.*")}
    second = HEAD.format(seeds="[0]") + subject("dog", ["a {class}"])  # seed 1, a prompt and cat removed
    gen(second, "-q")
    assert len(json.loads(squeeze("status", str(gen.out), "--json").out)["stale"]["images"]) == 5
    assert not (gen.out / ".stale").exists()
    index = (gen.out / "index.jsonl").read_text().splitlines()
    assert len(index) == 6  # the stale images' lines are kept until --prune

    result = gen(second, "--prune")
    assert "moved 5 stale images to .stale/" in result.err
    assert stale_files(gen.out) == sorted(
        [f"cat/000-s{seed}.{ext}" for seed in (0, 1) for ext in ("png", "json")]
        + ["cat/contact-sheet.png", "cat/grid-000.png"]
        + [f"dog/000-s1.{ext}" for ext in ("png", "json")]
        + [f"dog/001-s{seed}.{ext}" for seed in (0, 1) for ext in ("png", "json")]
        + ["dog/grid-001.png"]
    )
    for path in (gen.out / ".stale").glob("*/*/*"):
        assert path.read_bytes() == before[f"{path.parent.name}/{path.name}"]  # moved whole
    jobs = plan_of(gen.project / "m.yaml")
    index = [strict_loads(line) for line in (gen.out / "index.jsonl").read_text().splitlines()]
    assert [line["job_id"] for line in index] == [job.job_id for job in jobs]
    assert sorted(p.name for p in (gen.out / "dog").iterdir()) == [
        "000-s0.json",
        "000-s0.png",
        "contact-sheet.png",
        "grid-000.png",
    ]
    assert not (gen.out / "cat").exists()  # emptied by the moves: removed, not left behind empty
    status = json.loads(squeeze("status", str(gen.out), "--json").out)
    assert status["stale"] == {"count": 0, "images": []} and status["complete"] is True
    names_match_the_plan(gen.out, jobs)


def test_prune_removes_the_folders_it_emptied_and_only_those(gen) -> None:
    # The catalog walk-through: a product dropped from the feed leaves no empty folders in the folder
    # the shop publishes, variants' folders included.
    variants = "output: {variants: [{name: amazon, size: 40x40}, {name: social, size: 24x24, format: png}]}\n"
    both = HEAD.format(seeds="[0]") + subject("bag", ["a {class}"]) + subject("can", ["a {class}"])
    gen(both + variants, "-q")
    assert sorted(p.name for p in (gen.out / "can" / "variants").iterdir()) == ["amazon", "social"]
    (gen.out / "can" / "variants" / "social" / "notes.txt").write_text("mine")  # a user's file stays

    gen(HEAD.format(seeds="[0]") + subject("bag", ["a {class}"]) + variants, "--prune", "-q")
    assert len(list((gen.out / ".stale").glob("*/can/variants/*/000-s0.*"))) == 2  # moved, not deleted
    assert sorted(str(p.relative_to(gen.out)) for p in (gen.out / "can").rglob("*")) == [
        "can/variants",
        "can/variants/social",
        "can/variants/social/notes.txt",
    ]
    assert (gen.out / "bag" / "variants" / "amazon").is_dir()

    # Killed after its moves, before the removals: the next prune removes what the moves emptied.
    (gen.out / "can" / "variants" / "social" / "notes.txt").unlink()
    (gen.out / "mine" / "empty").mkdir(parents=True)  # nothing was ever moved out of it: it stays
    gen(HEAD.format(seeds="[0]") + subject("bag", ["a {class}"]) + variants, "--prune", "-q")
    assert not (gen.out / "can").exists() and (gen.out / "mine" / "empty").is_dir()


def test_emptied_folders_are_removed_within_out_and_never_a_planned_subjects(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    for folder in ("dog/variants/amazon", "cat/variants/amazon", "cow/variants/amazon"):
        (out / folder).mkdir(parents=True)
        (out / ".stale" / "t" / folder).mkdir(parents=True)
    (outside / "variants" / "amazon").mkdir(parents=True)
    (out / "cow" / "variants" / "amazon").rmdir()
    (out / "cow" / "variants" / "amazon").symlink_to(outside / "variants" / "amazon")  # not followed
    (out / "ant").symlink_to(outside)  # a link directly under OUT: no folder of OUT's
    (out / ".stale" / "t" / "ant" / "variants" / "amazon").mkdir(parents=True)

    removed = remove_emptied_folders(out, {"dog"})  # dog is planned: a shard may write into it now
    assert removed == ["cat/variants/amazon", "cat/variants", "cat"]
    assert (out / "dog" / "variants" / "amazon").is_dir()
    assert os.path.islink(out / "cow" / "variants" / "amazon") and (outside / "variants" / "amazon").is_dir()
    assert os.path.islink(out / "ant")
    assert remove_emptied_folders(out, {"dog"}) == []


def test_stale_files_are_moved_within_out_and_never_through_a_link(tmp_path: Path) -> None:
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    old = make_job(prompt_index=0, seed=0, job_id="00000000000000aa")
    outputs.save_image(out, old, solid((9, 9, 9)), make_record(old))
    stale = find_stale(out, [make_job(prompt_index=1, seed=0, job_id="00000000000000bb")])
    assert [image.image for image in stale] == ["dog/000-s0.png"]

    (out / ".stale").symlink_to(outside, target_is_directory=True)
    with pytest.raises(outputs.UnsafeOutputPathError):
        move_stale(out, stale)
    assert not list(outside.iterdir()) and (out / "dog" / "000-s0.png").is_file()

    (out / ".stale").unlink()
    (out / ".stale").symlink_to(out / "dog", target_is_directory=True)  # inside OUT, still a link
    with pytest.raises(outputs.OutputWriteError):
        move_stale(out, stale)
    assert (out / "dog" / "000-s0.png").is_file()

    (out / ".stale").unlink()
    (out / "dog" / "000-s0.png").rename(out / "elsewhere.png")
    (out / "dog" / "000-s0.png").symlink_to(out / "elsewhere.png")  # a link at a stale name stays put
    assert move_stale(out, stale, folder="t") == ["dog/000-s0.json"]
    assert os.path.islink(out / "dog" / "000-s0.png")
    assert (out / ".stale" / "t" / "dog" / "000-s0.json").is_file()


def test_no_subject_can_take_the_stale_folder_name() -> None:
    with pytest.raises(outputs.UnsafeOutputPathError):
        layout.check_subject_name(outputs.STALE_DIR_NAME)


# `squeeze eval` scores the plan's images only ------------------------------------------------------------

import test_eval  # noqa: E402

made_run, run = test_eval.made_run, test_eval.run  # its fixtures: one tiny run, and a copy per test


def test_eval_scores_the_plans_images_only_and_names_the_recipe(squeeze, run: Path, made_run: Path) -> None:
    project = run.parent
    shutil.copytree(made_run.parent / "images", project / "images")  # the references, beside the manifest
    (project / "m.yaml").write_text(test_eval.MANIFEST.replace("      - a {class} on the beach\n", ""))
    assert squeeze("gen", str(project / "m.yaml"), "--out", str(run), "-q").code == 0
    summary = test_eval.evaluate(squeeze, str(run))["runs"][0]
    assert summary["images"] == 4  # not the 2 stale images of the removed prompt
    assert summary["stale"] == ["dog/001-s0.png", "dog/001-s1.png"]
    assert summary["recipe"] == "tiny"
    text = squeeze("eval", str(run), "--metrics", "tiny")
    assert "recipe tiny" in text.out and "2 stale image(s)" in text.out


def test_eval_never_scores_two_models_as_one_run(squeeze, run: Path) -> None:
    (run / "manifest.resolved.yaml").unlink()  # no plan to tell the current images from the others
    sidecar = run / "dog" / "000-s0.json"
    record = json.loads(sidecar.read_text())
    record["preset"], record["model"] = "trained-tiny-stage2", {**record["model"], "lora": {"path": "/x"}}
    sidecar.write_text(json.dumps(record))
    result = squeeze("eval", str(run), "--metrics", "tiny")
    assert result.code == 2, result.out
    assert "holds images of 2 models (tiny: 5, trained-tiny-stage2: 1)" in result.err
    assert not (run / "metrics.json").exists()


def test_prune_moves_a_removed_subjects_views_out_of_the_views_dir(gen) -> None:
    """With `output.views_dir`, a removed subject's grids and contact sheet stayed in OUT/<views_dir>/, as
    did the grid of a removed prompt position."""
    views = "output:\n  views_dir: .views\n"
    first = (
        HEAD.format(seeds="[0]")
        + subject("dog", ["a {class}", "a {class} on a rug"])
        + subject("cat", ["a {class} on a sofa"])
    ) + views
    gen(first, "-q")
    assert (gen.out / ".views" / "cat" / "grid-000.png").is_file()
    gen(HEAD.format(seeds="[0]") + subject("dog", ["a {class}"]) + views, "--prune", "-q")
    moved = sorted(
        str(p.relative_to(next((gen.out / ".stale").iterdir()))) for p in gen.out.glob(".stale/*/.views/*/*")
    )
    assert moved == [".views/cat/contact-sheet.png", ".views/cat/grid-000.png", ".views/dog/grid-001.png"]
    assert not (gen.out / ".views" / "cat").exists()  # emptied: removed
    assert sorted(p.name for p in (gen.out / ".views" / "dog").iterdir()) == [
        "contact-sheet.png",
        "grid-000.png",
    ]
