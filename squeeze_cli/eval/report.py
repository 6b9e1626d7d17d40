"""What people read: the terminal tables (one run, or runs side by side) and `report.html`. Torch-free."""

from __future__ import annotations

import html
import os
import statistics
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from squeeze_cli import outputs
from squeeze_cli.eval.gated import gate_line
from squeeze_cli.metrics.protocol import METRIC_LABELS


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(  # noqa: E731
        str(c).ljust(w) if i == 0 else str(c).rjust(w)
        for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_run(summary: dict[str, Any]) -> str:
    """One run: a row per subject and the overall means, then what was not evaluated."""
    metrics = summary["metrics"]
    header = ["subject", "images", *(METRIC_LABELS[m] for m in metrics)]
    rows = [
        [name, str(s["images"]), *(_fmt(s[m]) for m in metrics)] for name, s in summary["subjects"].items()
    ]
    overall = "overall (gated)" if summary.get("gate") else "overall"
    rows.append([overall, str(summary["images"]), *(_fmt(summary["overall"][m]) for m in metrics)])
    protocol = summary["protocol"]
    recipe = f"recipe {summary['recipe']}, " if summary.get("recipe") else ""
    lines = [
        f"run {summary['run']}  ({recipe}metrics: {protocol['metric_set']}, "
        f"references: {protocol['references']}, CLIP-T weight {protocol['clip_t']['weight']:g})"
    ]
    if "notes" in protocol:
        lines.append(f"note: {protocol['notes']['warning']}")
    if summary.get("gate"):
        lines.append(gate_line(summary["gate"]))
    if summary.get("checks"):
        lines.append(f"checks: {checks_line(summary['checks'])}")
    lines += _table(header, rows)
    lines += _not_evaluated(summary)
    return "\n".join(lines)


def unscored_line(summary: dict[str, Any]) -> str | None:
    """`DINO, CLIP-I, copy of 2 image(s)`: the metrics some images have no value of (`unscored`), or None."""
    by_count: dict[int, list[str]] = {}
    for metric, count in summary.get("unscored", {}).items():
        by_count.setdefault(count, []).append(METRIC_LABELS[metric])
    return "; ".join(f"{', '.join(labels)} of {count} image(s)" for count, labels in by_count.items()) or None


def _not_evaluated(summary: dict[str, Any]) -> list[str]:
    lines = []
    if unscored := unscored_line(summary):
        lines.append(
            f"not scored: {unscored} (null in metrics.jsonl; see metrics.json's notes): those means are "
            "over the other images"
        )
    if pending := summary.get("pending"):
        lines.append(
            f"not evaluated: {pending} job(s) of the run's plan not made yet: the means are over part of it "
            f"(`squeeze status {summary['run']}`)"
        )
    if summary["failed"]:
        lines.append(f"not evaluated: {len(summary['failed'])} failed job(s) (see metrics.json)")
    for item in summary["missing"]:
        lines.append(f"missing: {item}")
    if stale := summary.get("stale"):
        lines.append(
            f"not evaluated: {len(stale)} stale image(s) of jobs the run's plan does not have "
            "(see metrics.json; `squeeze gen MANIFEST --prune` moves them to .stale/)"
        )
    return lines


def summary_rows(
    summaries: Sequence[dict[str, Any]], names: Sequence[str]
) -> list[tuple[str | None, str, dict[str, Any], dict[str, Any], int]]:
    """(subject or None for overall, run name, summary, means, images): one per subject and run that has
    it, every run's overall last. The rows of the side-by-side table and of the report's summary."""
    subjects = list(dict.fromkeys(name for s in summaries for name in s["subjects"]))
    rows = []
    for subject in [*subjects, None]:
        for name, summary in zip(names, summaries, strict=True):
            block = summary["overall"] if subject is None else summary["subjects"].get(subject)
            if block is not None:
                count = summary["images"] if subject is None else block["images"]
                rows.append((subject, name, summary, block, count))
    return rows


def unpaired_line(names: Sequence[str], rows: Sequence[Sequence[dict[str, Any]]]) -> str | None:
    """A warning when runs side by side do not hold the same images (subject, prompt, seed): each run's
    means are over its own images, so a difference between runs is partly one of images. None when
    they pair up one to one."""
    keys = [{(row["subject"], row["prompt"], row["seed"]) for row in run_rows} for run_rows in rows]
    shared = set.intersection(*keys) if keys else set()
    if all(run_keys == shared for run_keys in keys):
        return None
    extra = ", ".join(f"{name} {len(run_keys - shared)}" for name, run_keys in zip(names, keys, strict=True))
    return (
        f"warning: the runs do not hold the same images (subject, prompt, seed): {len(shared)} in every run, "
        f"besides them {extra}: each run's means are over its own images, not over pairs (the report's "
        "gallery shows them prompt by prompt)"
    )


def format_comparison(
    summaries: Sequence[dict[str, Any]], names: Sequence[str], rows: Sequence[Sequence[dict[str, Any]]]
) -> str:
    """Runs side by side: one row per (subject, run), the overall rows last; a warning when the runs'
    images (`rows`, each run's) do not pair up."""
    metrics = list(dict.fromkeys(m for s in summaries for m in s["metrics"]))
    header = ["subject", "run", "images", *(METRIC_LABELS[m] for m in metrics)]
    table = [
        [
            subject or "overall",
            f"{name} (gated)" if summary.get("gate") else name,
            str(count),
            *(_fmt(block.get(m)) for m in metrics),
        ]
        for subject, name, summary, block, count in summary_rows(summaries, names)
    ]
    lines = _table(header, table)
    if warning := unpaired_line(names, rows):
        lines.append(warning)
    for name, summary in zip(names, summaries, strict=True):
        if summary.get("recipe"):
            lines.append(f"{name}: recipe {summary['recipe']}")
        if summary.get("gate"):
            lines.append(f"{name}: {gate_line(summary['gate'])}")
        if summary.get("checks"):
            lines.append(f"{name}: {checks_line(summary['checks'])}")
        lines += [f"{name}: {line}" for line in _not_evaluated(summary)]
    return "\n".join(lines)


def checks_line(checks: dict[str, Any]) -> str:
    """`amazon-main on the masters: 4 passed, 2 failed`, from a summary's `checks`."""
    return outputs.checks_counts_line(checks["rules"], checks["variant"], checks["passed"], checks["failed"])


# ----------------------------------------------------------------------------------------------------
# report.html
# ----------------------------------------------------------------------------------------------------

Evaluation = tuple[str, Path, dict[str, Any], Sequence[dict[str, Any]]]  # name, run dir, summary, rows

# One colour per run, in the summary's order, the plots' and the gallery's (Tableau 10).
_RUN_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1", "#edc948", "#9c755f")
_THUMB_PX = 112
_BINS = 30

_STYLE = f"""
body{{font:14px system-ui,sans-serif;margin:16px;color:#222}}
h2{{margin-top:28px}}
table{{border-collapse:collapse;margin-top:8px}}
th,td{{border:1px solid #ddd;padding:4px 6px;vertical-align:top}}
th.sortable{{cursor:pointer;background:#f3f3f3;user-select:none}}
th.sorted-asc::after{{content:" \\25B2"}}th.sorted-desc::after{{content:" \\25BC"}}
td.num{{text-align:right;font-variant-numeric:tabular-nums}}
table.summary td.subject{{font-weight:600}}
.run-mark{{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}}
figure{{display:inline-block;margin:0 4px 4px 0;vertical-align:top;font-size:12px}}
figure img{{width:{_THUMB_PX}px;height:{_THUMB_PX}px;object-fit:contain;background:#f6f6f6;display:block}}
td.shots{{white-space:nowrap}}
td.refs div{{display:grid;grid-template-columns:repeat(2,{_THUMB_PX // 2}px);gap:2px}}
td.refs img{{width:{_THUMB_PX // 2 - 2}px;height:{_THUMB_PX // 2 - 2}px;object-fit:contain;
  border:1px solid #ccc}}
td.prompt{{min-width:160px}}
figure.fails img{{outline:3px solid #e8a33d}}
.fail{{color:#a40}}
.dist{{display:inline-block;margin:0 16px 16px 0}}
.broken{{outline:3px solid #d00}}
.warning{{color:#a00}}
"""

# Sorting, filtering and a visible count of images that failed to load. `#sort=<column>[&desc]` opens
# the page sorted (through the same click handler as a person's click). Thumbnails load lazily, so a
# broken one is counted when its own `error` event comes (a capturing listener on the document, there
# before any image), not at the page's `load`, which off-screen thumbnails do not wait for.
_SCRIPT = """
let broken=0;
document.addEventListener('error',e=>{
  if(e.target.tagName!=='IMG')return;
  e.target.classList.add('broken');broken++;
  document.getElementById('broken').textContent=broken+' image(s) could not be loaded';
},true);
function sortBy(th){
  const table=th.closest('table'), body=table.tBodies[0], col=th.cellIndex;
  const desc=th.classList.contains('sorted-asc');
  table.querySelectorAll('th').forEach(h=>h.classList.remove('sorted-asc','sorted-desc'));
  th.classList.add(desc?'sorted-desc':'sorted-asc');
  const key=r=>{const v=r.cells[col].dataset.value;
    return v===undefined||v===''?(desc?-Infinity:Infinity):parseFloat(v);};
  const rows=[...body.rows].sort((a,b)=>desc?key(b)-key(a):key(a)-key(b));
  rows.forEach(r=>body.appendChild(r));
}
function applyFilter(){
  const q=document.getElementById('filter').value.toLowerCase();
  const rows=document.querySelectorAll('table.gallery tbody tr');
  rows.forEach(r=>{r.hidden=q&&!r.dataset.text.includes(q);});
  document.getElementById('shown').textContent=[...rows].filter(r=>!r.hidden).length;
}
document.addEventListener('DOMContentLoaded',()=>{
  document.querySelectorAll('table.gallery th.sortable')
    .forEach(th=>th.addEventListener('click',()=>sortBy(th)));
  document.getElementById('filter').addEventListener('input',applyFilter);
  const hash=new URLSearchParams(location.hash.slice(1));
  if(hash.get('filter')){document.getElementById('filter').value=hash.get('filter');}
  applyFilter();
  const col=hash.get('sort');
  // Unmark the column first: the first metric's starts sorted, and a click on it would reverse it.
  if(col){[...document.querySelectorAll('table.gallery th[data-column]')]
    .filter(th=>th.dataset.column===col)
    .forEach(th=>{th.classList.remove('sorted-asc');th.click();if(hash.has('desc'))th.click();});}
});
window.addEventListener('load',()=>{document.body.dataset.loaded='1';});
"""


def _link(target: str | Path, report_dir: Path) -> str:
    """A relative URL from the report to `target` (works from file://, and when both move together)."""
    relative = os.path.relpath(Path(target).resolve(), report_dir.resolve())
    return html.escape(urllib.parse.quote("/".join(relative.split(os.sep))), quote=True)


def render_report(evaluations: Sequence[Evaluation], report_dir: Path) -> str:
    """The HTML of a report over one or several runs (name, run dir, summary, rows), side by side.

    In order: a paragraph per run; the summary table (per subject and run: images, means, failed checks);
    each metric's distribution per run (inline SVG); the gallery, per subject a table with a row per
    prompt: its references, then each run's images (every seed, lazily loaded thumbnails linking the
    full image) and the run's means over them. Rows start worst first (lowest mean of the first metric
    in the first run); every metric header sorts on a click.
    """
    names = [name for name, *_ in evaluations]
    summaries = [summary for _, _, summary, _ in evaluations]
    metrics = list(dict.fromkeys(m for s in summaries for m in s["metrics"]))
    title = "squeeze eval: " + ", ".join(names)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        *(
            _run_line(number, name, run_dir, summary)
            for number, (name, run_dir, summary, _) in enumerate(evaluations)
        ),
        "<p><span id='broken' class='warning'></span></p>",
        "<h2>Summary</h2>",
        *(
            [f"<p class='warning unpaired'>{html.escape(warning)}</p>"]
            if len(evaluations) > 1 and (warning := unpaired_line(names, [rows for *_, rows in evaluations]))
            else []
        ),
        _summary_table(evaluations, metrics),
    ]
    plots = [_distribution(metric, evaluations) for metric in metrics]
    if any(plots):
        parts += ["<h2>Distributions</h2>", *plots]
    parts += [
        "<h2>Gallery</h2>",
        "<p>Filter <input id='filter' placeholder='subject, prompt...'> <span id='shown'></span> prompts "
        "shown. Click a column to sort (again to reverse). A thumbnail opens the full image.</p>",
        *_gallery(evaluations, metrics, report_dir),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def _run_mark(number: int) -> str:
    return f"<span class='run-mark' style='background:{_RUN_COLOURS[number % len(_RUN_COLOURS)]}'></span>"


def _run_line(number: int, name: str, run_dir: Path, summary: dict[str, Any]) -> str:
    """The paragraph that introduces one run: its overall means, protocol and what it lacks."""
    protocol = summary["protocol"]
    overall = ", ".join(f"{METRIC_LABELS[m]} {_fmt(summary['overall'].get(m))}" for m in summary["metrics"])
    facts = [
        f"{summary['images']} images",
        overall,
        f"metrics {html.escape(protocol['metric_set'])}, references {html.escape(protocol['references'])}",
    ]
    if summary.get("recipe"):
        facts.append(f"recipe {html.escape(summary['recipe'])}")
    if "notes" in protocol:
        facts.append(f"<span class='warning'>{html.escape(protocol['notes']['warning'])}</span>")
    if summary.get("gate"):
        facts.append(f"<span class='warning gated'>{html.escape(gate_line(summary['gate']))}</span>")
    if summary.get("checks"):
        checks = summary["checks"]
        kind = "fail checks" if checks["failed"] else "checks"
        facts.append(f"<span class='{kind}'>{html.escape(checks_line(checks))}</span>")
    if unscored := unscored_line(summary):
        facts.append(f"<span class='warning'>not scored: {html.escape(unscored)}</span>")
    if summary.get("pending"):
        facts.append(f"<span class='warning'>{summary['pending']} not made yet (unfinished run)</span>")
    if summary["failed"]:
        facts.append(f"{len(summary['failed'])} failed")
    if summary["missing"]:
        facts.append(f"{len(summary['missing'])} missing")
    return (
        f"<p class='run'>{_run_mark(number)}<b>{html.escape(name)}</b> ({html.escape(str(run_dir))}): "
        f"{'; '.join(facts)}</p>"
    )


def _summary_table(evaluations: Sequence[Evaluation], metrics: Sequence[str]) -> str:
    """Per subject, a row per run (as `format_comparison`), the overall rows last; with rule checks, how
    many of the subject's images fail them."""
    names = [name for name, *_ in evaluations]
    summaries = [summary for _, _, summary, _ in evaluations]
    numbers = {name: number for number, name in enumerate(names)}
    with_checks = any(summary.get("checks") for summary in summaries)
    failed_checks: dict[tuple[str, str | None], int] = {}
    for name, _, _, rows in evaluations:
        for row in rows:
            if not row.get("check", {"passed": True})["passed"]:
                for subject in (row["subject"], None):
                    failed_checks[name, subject] = failed_checks.get((name, subject), 0) + 1
    header = ["subject", "run", "images", *(METRIC_LABELS[m] for m in metrics)]
    header += ["failed checks"] if with_checks else []
    lines = [
        "<table class='summary'><thead><tr>"
        + "".join(f"<th>{html.escape(cell)}</th>" for cell in header)
        + "</tr></thead><tbody>"
    ]
    for subject, name, summary, block, count in summary_rows(summaries, names):
        run = f"{name} (gated)" if summary.get("gate") else name
        cells = [
            f"<td class='subject'>{html.escape(subject or 'overall')}</td>",
            f"<td>{_run_mark(numbers[name])}{html.escape(run)}</td>",
            _number_cell(count, str(count)),
            *(_number_cell(block.get(m), _fmt(block.get(m))) for m in metrics),
        ]
        if with_checks:
            failed = failed_checks.get((name, subject), 0) if summary.get("checks") else None
            cells.append(_number_cell(failed, "-" if failed is None else str(failed)))
        lines.append(f"<tr>{''.join(cells)}</tr>")
    lines.append("</tbody></table>")
    return "\n".join(lines)


def _distribution(metric: str, evaluations: Sequence[Evaluation]) -> str:
    """One metric's distribution in each run, as an inline SVG: a histogram per run on one shared axis
    (bars scaled to the run's fullest bin, so shapes compare at any count), its quartiles and median
    under it, and n, mean and median beside it. Empty when no run has a value."""
    per_run = [
        (number, name, sorted(row[metric] for row in rows if row.get(metric) is not None))
        for number, (name, _, _, rows) in enumerate(evaluations)
    ]
    values = [value for *_, run_values in per_run for value in run_values]
    if not values:
        return ""
    low, high = min(values), max(values)
    if high - low < 1e-9:  # one value everywhere: a visible bar in the middle
        low, high = low - 0.5, high + 0.5
    label_px, plot_px, stats_px, row_px = 150, 360, 230, 44
    width, height = label_px + plot_px + stats_px, row_px * len(per_run) + 22

    def x(value: float) -> float:
        return label_px + (value - low) / (high - low) * plot_px

    label = METRIC_LABELS[metric]
    shapes = []
    for row_number, (number, name, run_values) in enumerate(per_run):
        top, colour = row_number * row_px, _RUN_COLOURS[number % len(_RUN_COLOURS)]
        shapes.append(
            f"<text x='{label_px - 8}' y='{top + 20}' text-anchor='end'>"
            f"{html.escape(_shorten(name, 22))}</text>"
        )
        if not run_values:
            shapes.append(f"<text x='{label_px}' y='{top + 20}' fill='#888'>no values</text>")
            continue
        counts = [0] * _BINS
        for value in run_values:
            counts[min(int((value - low) / (high - low) * _BINS), _BINS - 1)] += 1
        fullest, bar_px = max(counts), plot_px / _BINS
        shapes += [
            f"<rect x='{label_px + i * bar_px:.1f}' y='{top + 28 - 26 * c / fullest:.1f}' "
            f"width='{bar_px - 1:.1f}' height='{26 * c / fullest:.1f}' fill='{colour}'>"
            f"<title>{c}</title></rect>"
            for i, c in enumerate(counts)
            if c
        ]
        q1, median, q3 = _quartiles(run_values)
        shapes += [
            f"<line x1='{x(run_values[0]):.1f}' x2='{x(run_values[-1]):.1f}' y1='{top + 35}' y2='{top + 35}' "
            f"stroke='{colour}'/>",
            f"<rect x='{x(q1):.1f}' y='{top + 31}' width='{max(x(q3) - x(q1), 1):.1f}' height='8' "
            f"fill='white' stroke='{colour}'/>",
            f"<line x1='{x(median):.1f}' x2='{x(median):.1f}' y1='{top + 30}' y2='{top + 40}' stroke='#222' "
            "stroke-width='2'/>",
            f"<text x='{label_px + plot_px + 10}' y='{top + 20}'>n {len(run_values)}, mean "
            f"{_fmt(statistics.fmean(run_values))}, median {_fmt(median)}</text>",
        ]
    axis = height - 20
    shapes += [
        f"<line x1='{label_px}' x2='{label_px + plot_px}' y1='{axis}' y2='{axis}' stroke='#888'/>",
        *(
            f"<text x='{x(tick):.1f}' y='{axis + 14}' text-anchor='middle' fill='#555'>{_fmt(tick)}</text>"
            for tick in (low, (low + high) / 2, high)
        ),
    ]
    return (
        f"<figure class='dist' data-metric='{metric}'><figcaption><b>{html.escape(label)}</b></figcaption>"
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' font-size='12' "
        f"role='img' aria-label='{html.escape(label, quote=True)} per run'>{''.join(shapes)}</svg></figure>"
    )


def _quartiles(ordered: Sequence[float]) -> tuple[float, float, float]:
    if len(ordered) == 1:
        return ordered[0], ordered[0], ordered[0]
    q1, median, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    return q1, median, q3


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else "…" + text[-(limit - 1) :]


def _gallery(evaluations: Sequence[Evaluation], metrics: Sequence[str], report_dir: Path) -> list[str]:
    """Per subject a table, a row per prompt: references, then per run its images and means.

    A row is a subject's prompt as the images record it, not its `prompt_index`: that is a position in each
    run's own manifest, so runs whose manifests order or add prompts differently would put different
    prompts in one row. Rows come in the first run's order, then the prompts only the others have; a run
    without the prompt shows `missing`.
    """
    prompts: dict[tuple[str, str], dict[int, list[dict[str, Any]]]] = {}
    for number, (_, _, _, rows) in enumerate(evaluations):
        for row in sorted(rows, key=lambda row: (row["prompt_index"], row["seed"])):
            prompts.setdefault((row["subject"], row["prompt"]), {}).setdefault(number, []).append(row)
    # Each run's means over the row's images: its summary's per-prompt means, or, for a prompt its manifest
    # repeats, over both numbers' images, as the row shows them.
    means = {
        key: {number: mean_metrics(rows, metrics) for number, rows in runs.items()}
        for key, runs in prompts.items()
    }
    names = [name for name, *_ in evaluations]
    first_metric = metrics[0] if metrics else None
    several = len(evaluations) > 1
    header = ["<th>prompt</th><th>references</th>"]
    for number, (name, *_rest) in enumerate(evaluations):
        label = f" ({html.escape(name)})" if several else ""
        header.append(f"<th>{_run_mark(number) if several else ''}images{label}</th>")
        header += [
            f"<th class='sortable{' sorted-asc' if number == 0 and m == first_metric else ''}' "
            f"data-column='{m}{'' if number == 0 else '-' + str(number)}'>{METRIC_LABELS[m]}{label}</th>"
            for m in metrics
        ]
    parts = []
    for subject in dict.fromkeys(key[0] for key in sorted(prompts)):
        parts.append(
            f"<section data-subject='{html.escape(subject, quote=True)}'><h3>{html.escape(subject)}</h3>"
            f"<table class='gallery'><thead><tr>{''.join(header)}</tr></thead><tbody>"
        )
        keys = [key for key in prompts if key[0] == subject]
        if first_metric is not None:  # rows without a value sort last, in prompt order
            keys.sort(key=lambda k: _sort_value(means.get(k, {}).get(0, {}).get(first_metric)))
        for key in keys:
            runs = prompts[key]
            any_run = next(iter(runs.values()))
            references = list(
                dict.fromkeys(r for rows in runs.values() for row in rows for r in row["references"])
            )
            # The number of the first run that has it; another run's own number, when it differs, beside it.
            others = [
                f"{_indices(rows)} in {names[number]}"
                for number, rows in runs.items()
                if _indices(rows) != _indices(any_run)
            ]
            label = f"{_indices(any_run)} {key[1]}" + (f" ({'; '.join(others)})" if others else "")
            cells = [
                f"<td class='prompt'>{html.escape(label)}</td>",
                "<td class='refs'><div>"
                + "".join(_thumbnail(Path(r), report_dir, "reference", r) for r in references)
                + "</div></td>",
            ]
            for number, (_, run_dir, _, _) in enumerate(evaluations):
                rows = sorted(runs.get(number, []), key=lambda row: row["seed"])
                if not rows:
                    cells.append("<td>missing</td>" + _number_cell(None, "-") * len(metrics))
                    continue
                cells.append(
                    "<td class='shots'>"
                    + "".join(_shot(row, run_dir, report_dir, metrics) for row in rows)
                    + "</td>"
                )
                mean = means.get(key, {}).get(number, {})
                cells += [_number_cell(mean.get(m), _fmt(mean.get(m))) for m in metrics]
            text = html.escape(f"{subject} {label}".lower(), quote=True)
            row_key = html.escape(f"{key[0]}/{key[1]}", quote=True)
            parts.append(f"<tr data-key='{row_key}' data-text='{text}'>{''.join(cells)}</tr>")
        parts.append("</tbody></table></section>")
    return parts


def mean_metrics(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> dict[str, float | None]:
    """The mean of each metric over the rows that have it (None when none has): `metrics.json`'s means
    (`scoring.summarise`) and the gallery's per prompt."""
    values = {m: [row[m] for row in rows if row.get(m) is not None] for m in metrics}
    return {m: statistics.fmean(found) if found else None for m, found in values.items()}


def _indices(rows: Sequence[dict[str, Any]]) -> str:
    """`#2`, the prompt's number in its run's manifest (`#2/#5` when the manifest repeats the prompt)."""
    return "/".join(f"#{index}" for index in dict.fromkeys(row["prompt_index"] for row in rows))


def _thumbnail(target: Path, report_dir: Path, alt: str, title: str) -> str:
    """A lazily loaded thumbnail (a fixed box: nothing moves as images arrive) linking the full image."""
    source = _link(target, report_dir)
    return (
        f"<a href='{source}'><img src='{source}' loading='lazy' decoding='async' width='{_THUMB_PX}' "
        f"height='{_THUMB_PX}' alt='{html.escape(alt, quote=True)}' "
        f"title='{html.escape(title, quote=True)}'></a>"
    )


def _shot(row: dict[str, Any], run_dir: Path, report_dir: Path, metrics: Sequence[str]) -> str:
    """One image of a run in the gallery: its thumbnail, seed and first metric; every score, and the rule
    check's numbers, in its tooltip; a failed check outlined and named."""
    scores = [f"{METRIC_LABELS[m]} {_fmt(row.get(m))}" for m in metrics]
    caption = [f"s{row['seed']}", *scores[:1]]
    if row.get("gated"):
        caption.append(f"<span class='gated'>{_gated_caption(row)}</span>")
    check, fails = row.get("check"), ""
    if check is not None:
        measured = check.get("error") or ", ".join(
            f"{key} {value:g}" for key, value in check["measured"].items()
        )
        scores.append(("passes the rules" if check["passed"] else "fails the rules") + f": {measured}")
        if not check["passed"]:
            fails = " class='fails'"
            broken = check.get("error") or ", ".join(
                f"{rule} ({_measured_for(rule, check['measured'])})" for rule in check["failed"]
            )
            caption.append(f"<span class='fail'>fails {html.escape(broken)}</span>")
    title = f"{row['image']}: seed {row['seed']}, {', '.join(scores)}"
    return (
        f"<figure{fails} data-image='{html.escape(row['image'], quote=True)}'>"
        f"{_thumbnail(run_dir / row['image'], report_dir, row['image'], title)}"
        f"<figcaption>{'<br>'.join(caption)}</figcaption></figure>"
    )


def _measured_for(rule: str, measured: dict[str, float | int]) -> str:
    """The number a rule was judged on: `min_fill` on `fill`, `min_longest_side` on `longest_side`."""
    key = rule.removeprefix("min_")
    return f"{key} {measured[key]:g}" if key in measured else rule


def _gated_caption(row: dict[str, Any]) -> str:
    attempts = row.get("gate_attempts")
    return f"gated: best DINO of {attempts} seed{'s' if attempts > 1 else ''}" if attempts else "gated"


def _number_cell(value: float | None, text: str) -> str:
    data = "" if value is None else f"{value:.6f}"
    return f"<td class='num' data-value='{data}'>{text}</td>"


def _sort_value(value: float | None) -> float:
    return float("inf") if value is None else value


def write_report(evaluations: Sequence[Evaluation], run_dir: Path) -> Path:
    """`run_dir/report.html`, atomically: by its plain name (`run_dir` is the run's real folder), so a
    link there is replaced, not written through (as `write_metrics`)."""
    return outputs.atomic_write_text(run_dir / outputs.REPORT_NAME, render_report(evaluations, run_dir))
