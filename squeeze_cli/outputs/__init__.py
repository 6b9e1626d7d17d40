"""Everything about the files a run writes: names, atomic writes, PNG metadata, sidecars, the run index,
grids and contact sheets. Torch-free: PIL, json and os only.

The output directory is a documented contract (docs/outputs.md)::

    OUT/<subject>/<prompt_index:03d>-s<seed>.png   the image; metadata in `parameters` and `squeeze` chunks
    OUT/<subject>/<prompt_index:03d>-s<seed>.json  the sidecar: the full record; written last = "done"
    OUT/<subject>/grid-<prompt_index:03d>.png      references + every seed of one prompt, labelled
    OUT/<subject>/contact-sheet.png                every prompt of one subject (the first 50; then
    OUT/<subject>/contact-sheet-<page:03d>.png     the next 50 per page)
    OUT/index.jsonl                                one line per finished (or failed) job
    OUT/run.json                                   the run summary
    OUT/manifest.resolved.yaml                     the manifest with the preset merged: reproduces the run

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

# The public API of the layer, in one namespace for `from squeeze_cli import outputs`.
from .files import (  # noqa: F401
    OutputWriteError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_dir,
    json_ready,
    remove_stale_temp_files,
    strict_json_dumps,
)
from .grids import (  # noqa: F401
    GRID_MAX_COLUMNS,
    GRID_THUMB_HEIGHT,
    SHEET_MAX_COLUMNS,
    SHEET_THUMB_HEIGHT,
    PageViews,
    PromptViews,
    SheetRow,
    draw_views,
    plan_views,
    pool_workers,
    share_views,
    update_views,
    view_inputs,
    views_inputs,
    write_contact_sheet,
    write_prompt_grid,
    write_validation_grid,
)
from .index import (  # noqa: F401
    append_index,
    failed_index_entry,
    index_entry,
    planned_images,
    read_index,
    repair_index,
    write_resolved_manifest,
    write_run_summary,
)
from .layout import (  # noqa: F401
    CONTACT_SHEET_NAME,
    CONTACT_SHEET_PAGE_PROMPTS,
    INDEX_NAME,
    LAYOUT_LOCK_NAME,
    LOCK_NAME,
    METRICS_CACHE_NAME,
    METRICS_JSON_NAME,
    METRICS_JSONL_NAME,
    REPORT_NAME,
    RESERVED_NAMES,
    RESOLVED_MANIFEST_NAME,
    RUN_SUMMARY_NAME,
    SHARDS_DIR_NAME,
    UnsafeOutputPathError,
    check_subject_name,
    contact_sheet_name,
    contact_sheet_page,
    contact_sheet_pages,
    contact_sheet_path,
    grid_path,
    image_name,
    image_path,
    image_stem,
    index_path,
    position_stem,
    resolved_manifest_path,
    run_dir,
    run_summary_path,
    safe_join,
    sidecar_name,
    sidecar_path,
    subject_dir,
)
from .records import (  # noqa: F401
    PNG_FILE_KEY,
    PNG_PARAMETERS_KEY,
    PNG_RECORD_KEY,
    RECORD_FORMAT,
    encode_png,
    image_record,
    package_versions,
    parameters_text,
    read_png_parameters,
    read_png_record,
    read_sidecar,
    save_image,
)
from .resume import (  # noqa: F401
    Finished,
    find_finished,
    finished_job_ids,
    move_to_positions,
)
from .tree import check_output_tree  # noqa: F401
