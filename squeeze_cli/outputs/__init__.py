"""Everything about the files a run writes: names, atomic writes, PNG metadata, sidecars, the run index,
grids and contact sheets. Torch-free: PIL, json and os only.

Modules: `layout` (every name on disk, `safe_join`), `files` (atomic writes), `records` (an image's record,
PNG chunks, sidecar), `resume` (finished jobs by job id), `index` (the run index and run-level files),
`grids` (how a grid or contact-sheet page looks, and the hash of what it shows), `views` (which views to
redraw, shared between processes), `stale` (images of jobs the plan no longer has, moved to `.stale/`),
`tree` (the output tree's shape, checked before a run), `variants` (channel copies of the finished images),
`checks` (marketplace rules measured on images), `run_plan` (a run folder's own plan, from its
`manifest.resolved.yaml`).

Imports follow one rule: code outside this package imports the package (`from squeeze_cli import outputs`)
and uses the names below, which are exactly the ones it uses; the modules inside import each other
directly and never this `__init__`, so the facade sits on top of its modules, not between them. Tests may
import the modules themselves.

The output directory is a documented contract (docs/outputs.md)::

    OUT/<subject>/<prompt_index:03d>-s<seed>.png   the image; metadata in `parameters` and `squeeze` chunks
    OUT/<subject>/<prompt_index:03d>-s<seed>.json  the sidecar: the full record; written last = "done"
    OUT/<subject>/grid-<prompt_index:03d>.png      references + every seed of one prompt, labelled
    OUT/<subject>/contact-sheet.png                every prompt of one subject (the first 50; then
    OUT/<subject>/contact-sheet-<page:03d>.png     the next 50 per page)
    OUT/<subject>/variants/<variant>/<stem>.<ext>  a channel copy of an image (`output.variants`)
    OUT/index.jsonl                                one line per finished (or failed) job
    OUT/run.json                                   the run summary
    OUT/manifest.resolved.yaml                     the manifest with the preset merged: reproduces the run
    OUT/.stale/<UTC time>/<subject>/               stale images moved out of the way (`gen --prune`)
    OUT/.squeeze-recipes.json                      `gen --recipe A,B`: its recipe folders, OUT/A/, OUT/B/

Guarantees the runner builds on:
- nothing is written outside OUT (`safe_join` resolves every path, symlinks included);
- every file appears whole or not at all (temporary file in the same directory, fsync, `os.replace`,
  fsync of the directory); a failed write removes its temporary file and keeps the previous file;
- an image is finished exactly when a sidecar in its subject's directory parses, carries the job's id
  and the PNG's size and sha256, and the PNG beside it matches them (`resume.find_finished`): the PNG is
  written before the sidecar, so a crash in between leaves an unfinished job, and a truncated or edited
  PNG is made again; finished images of moved prompts are renamed to their new names, never remade;
- `index.jsonl` only ever grows by whole lines (one `write` on an O_APPEND descriptor), and
  `repair_index` rebuilds it from the sidecars at the start of a run.
"""

from .checks import (  # noqa: F401
    CheckReport,
    RuleSet,
    check_job_image,
    check_run,
    checks_counts_line,
    format_report,
    load_rules,
)
from .export_state import read_export_state  # noqa: F401
from .files import (  # noqa: F401
    OutputWriteError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    fsync_dir,
    json_ready,
    remove_stale_temp_files,
    strict_json_dumps,
    write_fix,
)
from .grids import PageViews, write_validation_grid  # noqa: F401
from .index import (  # noqa: F401
    append_index,
    append_line,
    failed_index_entry,
    index_entry,
    iter_index,
    missing_recipes,
    planned_images,
    read_index,
    repair_index,
    write_recipes,
    write_resolved_manifest,
    write_run_summary,
)
from .layout import (  # noqa: F401
    EXPORT_FORMATS,
    EXPORT_LOCK_NAME,
    EXPORT_OTHER_SPLITS,
    EXPORT_STAGING_NAME,
    EXPORT_STATE_NAME,
    EXPORT_TRAIN_SPLIT,
    INDEX_NAME,
    LAYOUT_LOCK_NAME,
    LOCK_NAME,
    METRICS_CACHE_NAME,
    METRICS_JSON_NAME,
    METRICS_JSONL_NAME,
    REPORT_NAME,
    RESOLVED_MANIFEST_NAME,
    RUN_SUMMARY_NAME,
    STALE_DIR_NAME,
    UnsafeOutputPathError,
    holds_recipes,
    image_name,
    is_run_folder,
    real_folder,
    resolved_manifest_path,
    run_dir,
    runs_inside,
    safe_join,
    views_root,
)
from .records import PNG_FILE_KEY, VARIANTS_KEY, image_record, package_versions, read_sidecar, save_image  # noqa: F401
from .resume import (  # noqa: F401
    Finished,
    find_finished,
    finished_job_ids,
    move_to_positions,
    png_check,
    record_stamps,
)
from .run_plan import RunPlan, load_run_plan, not_a_run_folder, run_folders, run_plan_if_any  # noqa: F401
from .stale import (  # noqa: F401
    StaleImage,
    find_stale,
    find_stale_views,
    in_the_way,
    move_stale,
    remove_emptied_folders,
    stale_folder_name,
)
from .tree import check_output_tree  # noqa: F401
from .variants import make_variants  # noqa: F401
from .views import draw_views, plan_views, share_views, update_views, views_jobs  # noqa: F401
