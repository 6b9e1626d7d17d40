"""Which views to draw, and who draws them: `plan_views` finds the grids and contact-sheet pages whose
file is not what the finished images make, `share_views` splits them between the processes of a run, and
`draw_views` draws them here or in a pool of worker processes (`grids` holds how a view looks)."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any

from squeeze_cli.outputs.files import OutputWriteError
from squeeze_cli.outputs.grids import (
    PageViews,
    PromptViews,
    ReferenceThumbs,
    Thumb,
    draw_page,
    view_inputs,
    views_inputs,
)
from squeeze_cli.outputs.layout import (
    contact_sheet_page,
    contact_sheet_page_prompts,
    contact_sheet_pages,
    contact_sheet_path,
    grid_path,
    image_path,
    subject_dir,
    views_root,
)

if TYPE_CHECKING:
    from squeeze_cli.outputs.resume import Finished
    from squeeze_cli.plan import Job


def plan_views(
    out_dir: Path,
    jobs: Sequence[Job],
    finished: Mapping[str, Finished],
    *,
    grids: bool = True,
    contact_sheets: bool = True,
    prompts: Collection[tuple[str, int]] | None = None,
    views_dir: str | None = None,
) -> list[PageViews]:
    """The grids and contact-sheet pages whose file is not what this plan's finished images make: missing,
    undecodable, or drawn from other images (the `squeeze-view` chunk records the hash of a view's inputs:
    the prompt, the references and each image's job id and PNG hash). Removes the subject's contact-sheet
    pages beyond its page count (regular files only: those squeeze drew), so no stale page lingers.

    Args:
        jobs: the whole plan, or at least every job of the subjects to draw (a page's number follows from
            its subject's prompts).
        finished: `{job_id: Finished}` of the finished images, at their positions' names (with `prompts`,
            those of `views_jobs(jobs, prompts)` suffice).
        views_dir: `output.views_dir`: the views are in `OUT/<views_dir>/<subject>/` (None: in the subject's
            folder); `draw_views` is then given `views_root(out_dir, views_dir)`.
        prompts: only the views of these `(subject, prompt_index)`: their grids, and the contact-sheet
            pages that show them (a shard draws the views of its own images); None: every view.
    """
    root = views_root(out_dir, views_dir)
    work = []
    for subject, subject_group in groupby(jobs, key=lambda job: job.subject):
        subject_jobs = list(subject_group)
        if prompts is not None and not any((subject, job.prompt_index) in prompts for job in subject_jobs):
            continue
        references = tuple(str(path) for path in subject_jobs[0].references)
        by_prompt = [list(group) for _, group in groupby(subject_jobs, key=lambda job: job.prompt_index)]
        pages = contact_sheet_pages(len(by_prompt))
        if contact_sheets:
            _remove_pages_after(root, subject, pages)
        for page in range(1, pages + 1):
            page_jobs = by_prompt[contact_sheet_page_prompts(page)]
            if prompts is not None and not any((subject, p[0].prompt_index) in prompts for p in page_jobs):
                continue
            page_prompts: list[tuple[list[Job], str | None]] = []  # each prompt's jobs and grid inputs
            sheet_rows = []
            for prompt_jobs in page_jobs:
                prompt_index, prompt = prompt_jobs[0].prompt_index, _caption(prompt_jobs[0])
                images = [
                    (job.seed, job.job_id, finished[job.job_id].sha256 if job.job_id in finished else None)
                    for job in prompt_jobs
                ]
                sheet_rows.append((prompt_index, prompt, images))
                grid_inputs = None
                if grids and (prompts is None or (subject, prompt_index) in prompts):
                    inputs = views_inputs("grid", references, [(prompt_index, prompt, images)])
                    if view_inputs(grid_path(root, subject, prompt_index)) != inputs:
                        grid_inputs = inputs
                page_prompts.append((prompt_jobs, grid_inputs))
            sheet_inputs = None
            if contact_sheets:
                kind = "contact-sheet" if page == 1 else f"contact-sheet page {page}"
                inputs = views_inputs(kind, references, sheet_rows)
                if view_inputs(contact_sheet_path(root, subject, page)) != inputs:
                    sheet_inputs = inputs
            if sheet_inputs is not None or any(grid is not None for _, grid in page_prompts):
                # The images' paths only for a page to draw: a nightly rerun with every view current
                # checks (safe_join) no image path.
                drawn = tuple(_prompt_views(out_dir, group, finished, grid) for group, grid in page_prompts)
                work.append(PageViews(subject, page, references, drawn, sheet_inputs))
    return work


def _prompt_views(
    out_dir: Path, prompt_jobs: Sequence[Job], finished: Mapping[str, Finished], grid_inputs: str | None
) -> PromptViews:
    entries = tuple(
        (job.seed, str(image_path(out_dir, job)) if job.job_id in finished else None) for job in prompt_jobs
    )
    return PromptViews(prompt_jobs[0].prompt_index, _caption(prompt_jobs[0]), entries, grid_inputs)


def views_jobs(jobs: Sequence[Job], prompts: Collection[tuple[str, int]]) -> list[Job]:
    """The jobs of `jobs` whose images the views of `prompts` show (`plan_views(prompts=...)`): every job
    of the contact-sheet pages holding one of them, so only those images need to be looked for."""
    shown: list[Job] = []
    for subject, subject_jobs in groupby(jobs, key=lambda job: job.subject):
        by_prompt = [list(group) for _, group in groupby(subject_jobs, key=lambda job: job.prompt_index)]
        for page in range(1, contact_sheet_pages(len(by_prompt)) + 1):
            page_jobs = by_prompt[contact_sheet_page_prompts(page)]
            if any((subject, p[0].prompt_index) in prompts for p in page_jobs):
                shown.extend(job for prompt_jobs in page_jobs for job in prompt_jobs)
    return shown


def _remove_pages_after(out_dir: Path, subject: str, pages: int) -> None:
    folder = subject_dir(out_dir, subject)
    try:
        with os.scandir(folder) as entries:
            extra = [
                entry.path
                for entry in entries
                if (contact_sheet_page(entry.name) or 0) > pages and entry.is_file(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return
    except OSError as error:  # a file in the folder's place: a failed write, not a traceback after the run
        raise OutputWriteError.from_os_error(folder, error, "read the folder") from error
    for path in extra:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as error:
            raise OutputWriteError.from_os_error(Path(path), error, "remove") from error


def share_views(work: Sequence[PageViews], index: int, count: int) -> list[PageViews]:
    """Process `index`'s share of `work` among `count` processes: every page exactly once, the costliest
    first to whichever process has the least so far, so the shares end at about the same time."""
    loads = [0] * count
    shares: list[list[PageViews]] = [[] for _ in range(count)]
    for page in sorted(work, key=lambda page: -page.cost):  # stable: equal costs keep the plan's order
        least = loads.index(min(loads))
        shares[least].append(page)
        loads[least] += page.cost
    return shares[index]


def draw_views(
    out_dir: Path,
    work: Sequence[PageViews],
    should_stop: Callable[[], bool],
    *,
    workers: int | None = None,
) -> None:
    """Draw `work` (from `plan_views`) under `out_dir` (`views_root` of the run's `output.views_dir`): in
    this process, or in a pool of `workers` processes. Reference thumbnails are made once per subject and
    size. Stops early when `should_stop()`; an error in a worker is raised here.

    Args:
        workers: processes to draw with; None: every available core when there is enough to draw
            (`POOL_MIN_IMAGES` images to decode), else this process alone.
    """
    if workers is None:
        workers = pool_workers(work)
    references = ReferenceThumbs()
    if should_stop():
        return
    if workers <= 1 or len(work) < 2:
        for page in work:
            if should_stop():
                return
            draw_page(out_dir, page, references.of(page), should_stop)
        return
    _draw_in_pool(out_dir, work, references, should_stop, workers)


def update_views(
    out_dir: Path,
    jobs: Sequence[Job],
    finished: Mapping[str, Finished],
    should_stop: Callable[[], bool],
    *,
    grids: bool = True,
    contact_sheets: bool = True,
    workers: int | None = None,
    views_dir: str | None = None,
) -> None:
    """Draw a grid per (subject, prompt) and a contact sheet per subject (in pages of
    `layout.CONTACT_SHEET_PAGE_PROMPTS` prompts) where the file is not what this plan's finished images make
    (`plan_views`). So a view is redrawn after any of its images was made, remade, moved or lost, and
    after a killed or stopped run, and left alone otherwise. Stops early when `should_stop()`.

    Args:
        finished: `{job_id: Finished}` of the finished images, at their positions' names.
        workers: processes to draw with, as `draw_views` takes it (None: as many as the work needs).
        views_dir: `output.views_dir`, as `plan_views` takes it.
    """
    work = plan_views(
        out_dir, jobs, finished, grids=grids, contact_sheets=contact_sheets, views_dir=views_dir
    )
    draw_views(views_root(out_dir, views_dir), work, should_stop, workers=workers)


POOL_MIN_IMAGES = 200  # below this many images to decode, starting worker processes costs more than it saves


def pool_workers(work: Sequence[PageViews]) -> int:
    """Processes to draw `work` with: the available cores, or 1 when there is too little to draw."""
    if len(work) < 2 or sum(page.cost for page in work) < POOL_MIN_IMAGES:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, len(work))


# A pool worker's stop flag, set by the main process when it is told to stop (workers ignore the signals
# themselves: the main process decides, and waits for them).
_worker_stop: Any = None


def _start_worker(stop: Any) -> None:
    import signal

    global _worker_stop
    _worker_stop = stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _worker_should_stop() -> bool:
    return _worker_stop.is_set()


def _draw_page_in_worker(out_dir: Path, page: PageViews, references: dict[int, list[Thumb]]) -> None:
    draw_page(out_dir, page, references, _worker_should_stop)


def _draw_in_pool(
    out_dir: Path,
    work: Sequence[PageViews],
    references: ReferenceThumbs,
    should_stop: Callable[[], bool],
    workers: int,
) -> None:
    # Imported here: `squeeze status` imports this module and never draws with a pool.
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    # spawn: fresh workers that inherit no threads (torch's) and no signal handlers, and are this process's
    # own children (their CPU time and memory count as its children's).
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(stop,))
    with pool:
        pending = {pool.submit(_draw_page_in_worker, out_dir, page, references.of(page)) for page in work}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in done:
                    future.result()  # a worker's error is raised here
                if should_stop():
                    break
        finally:  # stopped, or an error: no new page starts, and the running ones end at their next prompt
            stop.set()
            for future in pending:
                future.cancel()


def _caption(job: Job) -> str:
    """A prompt's text in its grid and contact-sheet row, led by the sweep values it takes (they are what
    tells the rows of a sweep apart; the text, which may be cut, comes after)."""
    return f"[{job.sweep}]  {job.prompt}" if job.sweep else job.prompt
