"""Which grids and contact sheets are drawn, and by whom (docs/outputs.md, "Grids and contact sheets"): the
sheet comes in pages of `CONTACT_SHEET_PAGE_PROMPTS` prompts, only the views whose inputs changed are drawn
again, every reference and image is decoded once per drawing, and the work can be shared between
processes (a pool, or the processes of an `accelerate launch` run) with the same files as a result.
How a view looks: test_grids.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image
from test_outputs import make_job, solid

from squeeze_cli import outputs
from squeeze_cli.outputs import grids, layout, views


@pytest.fixture
def two_per_page(monkeypatch):
    monkeypatch.setattr(layout, "CONTACT_SHEET_PAGE_PROMPTS", 2)


def plan(tmp_path: Path, prompts: int, seeds: int = 1, subject: str = "dog") -> list:
    """Jobs of one subject with two real references, in plan order."""
    references = []
    for number, color in enumerate([(0, 0, 200), (0, 120, 0)]):
        path = tmp_path / "refs" / subject / f"{number}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        solid(color, (40, 30)).save(path)
        references.append(str(path))
    return [
        dataclasses.replace(
            make_job(subject, prompt_index, seed, job_id=f"{subject}-{prompt_index}-{seed}"),
            references=tuple(references),
        )
        for prompt_index in range(prompts)
        for seed in range(seeds)
    ]


def finish(out: Path, jobs: list, color: tuple[int, int, int] = (200, 0, 0)) -> dict:
    """Every job's image on disk; the `{job_id: Finished-like}` mapping `update_views` reads."""
    finished = {}
    for job in jobs:
        finished[job.job_id] = remake(out, job, color)
    return finished


def remake(out: Path, job, color: tuple[int, int, int]) -> SimpleNamespace:
    path = layout.image_path(out, job)
    path.parent.mkdir(parents=True, exist_ok=True)
    solid(color, (24, 24)).save(path)
    return SimpleNamespace(sha256=hashlib.sha256(path.read_bytes()).hexdigest())


@pytest.fixture
def writes(monkeypatch) -> list[str]:
    """The names of the views written (in this process), in order."""
    written: list[str] = []
    real = grids.atomic_write_bytes

    def recording(path, data):
        written.append(Path(path).name)
        return real(path, data)

    monkeypatch.setattr(grids, "atomic_write_bytes", recording)
    return written


def test_page_names_and_counts():
    assert [layout.contact_sheet_name(page) for page in (1, 2, 12)] == [
        "contact-sheet.png",
        "contact-sheet-002.png",
        "contact-sheet-012.png",
    ]
    assert [layout.contact_sheet_page(name) for name in ("contact-sheet.png", "contact-sheet-002.png")] == [
        1,
        2,
    ]
    for not_a_page in (
        "contact-sheet-001.png",
        "contact-sheet-2.png",
        "contact-sheet-002.jpg",
        "grid-002.png",
    ):
        assert layout.contact_sheet_page(not_a_page) is None
    per_page = layout.CONTACT_SHEET_PAGE_PROMPTS
    assert [layout.contact_sheet_pages(n) for n in (0, 1, per_page, per_page + 1)] == [1, 1, 1, 2]


def test_the_contact_sheet_is_split_into_pages(tmp_path, two_per_page):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=5)
    outputs.update_views(out, jobs, finish(out, jobs), lambda: False, grids=False)
    names = sorted(path.name for path in (out / "dog").glob("contact-sheet*.png"))
    assert names == ["contact-sheet-002.png", "contact-sheet-003.png", "contact-sheet.png"]
    pad = grids._PAD
    block = grids._line_height(grids._font(16)) + pad + 160 + grids._line_height(grids._font(14)) + 6 + pad
    for name, rows in [("contact-sheet.png", 2), ("contact-sheet-002.png", 2), ("contact-sheet-003.png", 1)]:
        with Image.open(out / "dog" / name) as image:
            assert image.height == (1 + rows) * block + pad  # the references, then this page's prompts
            assert image.info[grids.VIEW_INPUTS_KEY]
    assert not list((out / "dog").glob("grid-*.png"))


def test_only_the_views_of_a_changed_image_are_drawn_again(tmp_path, two_per_page, writes):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=5, seeds=2)
    finished = finish(out, jobs)
    outputs.update_views(out, jobs, finished, lambda: False, workers=1)
    assert len(writes) == 5 + 3
    writes.clear()
    outputs.update_views(out, jobs, finished, lambda: False, workers=1)
    assert writes == []  # nothing changed: nothing drawn
    changed = next(job for job in jobs if job.prompt_index == 3 and job.seed == 1)
    finished[changed.job_id] = remake(out, changed, (0, 0, 0))
    outputs.update_views(out, jobs, finished, lambda: False, workers=1)
    assert writes == ["grid-003.png", "contact-sheet-002.png"]  # its grid and its page, no other page


def test_pages_beyond_the_count_are_removed(tmp_path, two_per_page):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=5)
    outputs.update_views(out, jobs, finish(out, jobs), lambda: False)
    (out / "dog" / "contact-sheet-009.png").write_bytes(b"an older run's page")
    (out / "dog" / "contact-sheet-notes.png").write_bytes(b"not a page")
    fewer = [job for job in jobs if job.prompt_index < 3]  # prompts removed from the manifest: 2 pages
    outputs.update_views(out, fewer, finish(out, fewer), lambda: False)
    names = sorted(path.name for path in (out / "dog").glob("contact-sheet*.png"))
    assert names == ["contact-sheet-002.png", "contact-sheet-notes.png", "contact-sheet.png"]


def test_pages_are_left_alone_when_contact_sheets_are_off(tmp_path, two_per_page):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=5)
    outputs.update_views(out, jobs, finish(out, jobs), lambda: False)
    fewer = [job for job in jobs if job.prompt_index < 1]
    outputs.update_views(out, fewer, finish(out, fewer), lambda: False, contact_sheets=False)
    assert (out / "dog" / "contact-sheet-003.png").is_file()


def test_references_and_images_are_decoded_once(tmp_path, two_per_page, monkeypatch):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=5, seeds=2)
    finished = finish(out, jobs)
    loads: Counter[str] = Counter()
    real = grids.load_rgb

    def counting(path, *args, **kwargs):
        loads[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(grids, "load_rgb", counting)
    outputs.update_views(out, jobs, finished, lambda: False, workers=1)
    for reference in jobs[0].references:
        assert loads[reference] == 2  # once per thumbnail height (grids, sheets) for the 5 grids and 3 pages
    images = [str(layout.image_path(out, job)) for job in jobs]
    assert {path: loads[path] for path in images} == dict.fromkeys(images, 1)  # for its grid and its page


def page(subject: str, cost: int) -> grids.PageViews:
    prompt = grids.PromptViews(0, "p", tuple((seed, None) for seed in range(cost)), grid_inputs="x")
    return grids.PageViews(subject, 1, (), (prompt,), sheet_inputs=None)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_each_process_draws_its_share_and_every_page_is_drawn_once(count):
    work = [page(f"s{number}", cost) for number, cost in enumerate([5, 1, 9, 3, 3, 7, 2, 8, 1, 4])]
    shares = [outputs.share_views(work, index, count) for index in range(count)]
    drawn = [item.subject for share in shares for item in share]
    assert sorted(drawn) == sorted(item.subject for item in work) and len(set(drawn)) == len(work)
    loads = [sum(item.cost for item in share) for share in shares]
    assert max(loads) - min(loads) <= max(item.cost for item in work)  # about even


def test_without_a_worker_count_a_pool_draws_only_when_there_is_much_to_draw(tmp_path, monkeypatch):
    pools: list[int] = []
    monkeypatch.setattr(views, "_draw_in_pool", lambda out, work, refs, stop, workers: pools.append(workers))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    outputs.draw_views(tmp_path, [page("a", 1), page("b", 1)], lambda: False)
    assert pools == [] and (tmp_path / "a" / "grid-000.png").is_file()  # drawn here
    much = [page(f"s{number}", views.POOL_MIN_IMAGES // 4) for number in range(5)]
    outputs.draw_views(tmp_path, much, lambda: False)
    assert pools == [3]  # every available core
    outputs.draw_views(tmp_path, much, lambda: False, workers=1)
    assert pools == [3]  # told: one process


def test_a_pool_draws_the_same_files_as_one_process(tmp_path, two_per_page):
    folders = {}
    for workers in (1, 2):
        out = tmp_path / f"out-{workers}"
        jobs = plan(tmp_path, prompts=3, seeds=2) + plan(tmp_path, prompts=1, subject="cat")
        work = outputs.plan_views(out, jobs, finish(out, jobs))
        assert len(work) == 3  # 2 pages of dog, 1 of cat
        outputs.draw_views(out, work, lambda: False, workers=workers)
        folders[workers] = {
            path.relative_to(out): path.read_bytes()
            for path in sorted(out.rglob("*.png"))
            if path.name.startswith(("grid-", "contact-sheet"))
        }
    assert len(folders[1]) == 3 + 1 + 3
    assert folders[2] == folders[1]


def test_an_error_in_a_pool_worker_is_raised(tmp_path):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=1) + plan(tmp_path, prompts=1, subject="cat")
    finished = finish(out, jobs)
    (out / "cat" / "grid-000.png").mkdir()  # the grid cannot replace a folder
    with pytest.raises(outputs.OutputWriteError) as raised:
        outputs.update_views(out, jobs, finished, lambda: False, workers=2)
    assert raised.value.path == out / "cat" / "grid-000.png"


def test_a_pool_stops_when_told(tmp_path):
    out = tmp_path / "out"
    jobs = [job for number in range(40) for job in plan(tmp_path, prompts=1, subject=f"s{number:02d}")]
    finished = finish(out, jobs)

    def any_grid_drawn() -> bool:
        return any(out.glob("*/grid-*.png"))

    outputs.update_views(out, jobs, finished, any_grid_drawn, contact_sheets=False, workers=2)
    drawn = len(list(out.glob("*/grid-*.png")))
    # The pages started when it was told finish and no other starts; how many were started by then depends on
    # how soon a busy machine runs the main process again, so the bound is only that it stopped early.
    assert 1 <= drawn < len(jobs)
    outputs.update_views(out, jobs, finished, lambda: True, workers=1)
    assert len(list(out.glob("*/grid-*.png"))) == drawn  # told before anything: nothing drawn


def test_a_link_in_place_of_a_later_page_is_refused_before_the_run(tmp_path, two_per_page):
    out = tmp_path / "out"
    jobs = plan(tmp_path, prompts=3)
    (out / "dog").mkdir(parents=True)
    os.symlink(tmp_path / "elsewhere.png", out / "dog" / "contact-sheet-002.png")
    with pytest.raises(outputs.UnsafeOutputPathError, match="contact-sheet-002.png"):
        outputs.check_output_tree(out, out, jobs)
