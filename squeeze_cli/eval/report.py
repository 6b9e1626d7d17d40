"""What people read: the terminal tables (one run, or runs side by side) and `report.html`. Torch-free."""

from __future__ import annotations

import html
import os
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
    lines += _table(header, rows)
    lines += _not_evaluated(summary)
    return "\n".join(lines)


def _not_evaluated(summary: dict[str, Any]) -> list[str]:
    lines = []
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


def format_comparison(summaries: Sequence[dict[str, Any]], names: Sequence[str]) -> str:
    """Runs side by side: one row per (subject, run), the overall rows last."""
    metrics = list(dict.fromkeys(m for s in summaries for m in s["metrics"]))
    header = ["subject", "run", "images", *(METRIC_LABELS[m] for m in metrics)]
    subjects = list(dict.fromkeys(name for s in summaries for name in s["subjects"]))
    rows = []
    for subject in [*subjects, None]:
        for name, summary in zip(names, summaries, strict=True):
            block = summary["overall"] if subject is None else summary["subjects"].get(subject)
            if block is None:
                continue
            count = summary["images"] if subject is None else block["images"]
            run = f"{name} (gated)" if summary.get("gate") else name
            rows.append([subject or "overall", run, str(count), *(_fmt(block.get(m)) for m in metrics)])
    lines = _table(header, rows)
    for name, summary in zip(names, summaries, strict=True):
        if summary.get("recipe"):
            lines.append(f"{name}: recipe {summary['recipe']}")
        if summary.get("gate"):
            lines.append(f"{name}: {gate_line(summary['gate'])}")
        lines += [f"{name}: {line}" for line in _not_evaluated(summary)]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# report.html
# ----------------------------------------------------------------------------------------------------

_STYLE = """
body{font:14px system-ui,sans-serif;margin:16px;color:#222}
h2{margin-top:28px}
.refs img{height:96px;margin-right:6px;border:1px solid #ccc}
table{border-collapse:collapse;margin-top:8px}
th,td{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
th.sortable{cursor:pointer;background:#f3f3f3;user-select:none}
th.sorted-asc::after{content:" \\25B2"}th.sorted-desc::after{content:" \\25BC"}
td img{height:128px}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.low{background:#fde2e2}
.broken{outline:3px solid #d00}
.warning{color:#a00}
"""

# Sorting, filtering and a visible count of images that failed to load. `#sort=<column>[&desc]` opens
# the page sorted (through the same click handler as a person's click).
_SCRIPT = """
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
  document.querySelectorAll('tbody tr').forEach(r=>{r.hidden=q&&!r.textContent.toLowerCase().includes(q);});
  const shown=document.querySelectorAll('tbody tr:not([hidden])').length;
  document.getElementById('shown').textContent=shown;
}
document.addEventListener('DOMContentLoaded',()=>{
  document.querySelectorAll('th.sortable').forEach(th=>th.addEventListener('click',()=>sortBy(th)));
  document.getElementById('filter').addEventListener('input',applyFilter);
  const hash=new URLSearchParams(location.hash.slice(1));
  if(hash.get('filter')){document.getElementById('filter').value=hash.get('filter');}
  applyFilter();
  const col=hash.get('sort');
  if(col){[...document.querySelectorAll('th[data-column]')].filter(th=>th.dataset.column===col).forEach(th=>{th.click();if(hash.has('desc'))th.click();});}
});
window.addEventListener('load',()=>{
  let broken=0;
  document.querySelectorAll('img').forEach(img=>{
    img.dataset.naturalWidth=img.naturalWidth;
    if(!img.naturalWidth){img.classList.add('broken');broken++;}
  });
  document.getElementById('broken').textContent=broken?broken+' image(s) could not be loaded':'';
  document.body.dataset.loaded='1';
});
"""


def _link(target: str | Path, report_dir: Path) -> str:
    """A relative URL from the report to `target` (works from file://, and when both move together)."""
    relative = os.path.relpath(Path(target).resolve(), report_dir.resolve())
    return html.escape(urllib.parse.quote("/".join(relative.split(os.sep))), quote=True)


def render_report(
    evaluations: Sequence[tuple[str, Path, dict[str, Any], Sequence[dict[str, Any]]]], report_dir: Path
) -> str:
    """The HTML of a report over one or several runs (name, run dir, summary, rows), images side by side.

    Per subject: its references, then one table row per (prompt, seed) with every run's image and
    metrics; rows start worst first (lowest DINO of the first run); every metric header sorts on a click.
    """
    metrics = list(dict.fromkeys(m for _, _, s, _ in evaluations for m in s["metrics"]))
    by_key: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = {}
    for run_number, (_, _, _, rows) in enumerate(evaluations):
        for row in rows:
            by_key.setdefault((row["subject"], row["prompt_index"], row["seed"]), {})[run_number] = row
    first_metric = metrics[0] if metrics else None
    title = "squeeze eval: " + ", ".join(name for name, *_ in evaluations)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    for name, run_dir, summary, _ in evaluations:
        parts.append(_run_line(name, run_dir, summary))
    parts.append(
        "<p>Filter <input id='filter' placeholder='subject, prompt...'> <span id='shown'></span> rows shown. "
        "Click a column to sort (again to reverse). <span id='broken' class='warning'></span></p>"
    )
    subjects = list(dict.fromkeys(key[0] for key in sorted(by_key)))
    for subject in subjects:
        parts.append(
            f"<section data-subject='{html.escape(subject, quote=True)}'><h2>{html.escape(subject)}</h2>"
        )
        references = []
        for *_, rows in evaluations:
            for row in rows:
                if row["subject"] == subject:
                    references += [r for r in row["references"] if r not in references]
        parts.append(
            "<div class='refs'>references: "
            + "".join(
                f"<img src='{_link(r, report_dir)}' alt='reference' title='{html.escape(r, quote=True)}'>"
                for r in references
            )
            + "</div>"
        )
        header = ["<th>prompt</th><th>seed</th>"]
        for run_number, (name, *_rest) in enumerate(evaluations):
            label = f" ({html.escape(name)})" if len(evaluations) > 1 else ""
            header.append(f"<th>image{label}</th>")
            header += [
                f"<th class='sortable{' sorted-asc' if run_number == 0 and m == first_metric else ''}' "
                f"data-column='{m}{'' if run_number == 0 else '-' + str(run_number)}'>"
                f"{METRIC_LABELS[m]}{label}</th>"
                for m in metrics
            ]
        parts.append(f"<table><thead><tr>{''.join(header)}</tr></thead><tbody>")
        keys = [key for key in by_key if key[0] == subject]
        if first_metric is not None:  # no metrics: every key sorts as missing, the order stays
            keys.sort(key=lambda k: _sort_value(by_key[k].get(0, {}).get(first_metric)))
        for key in keys:
            runs = by_key[key]
            any_row = next(iter(runs.values()))
            cells = [
                f"<td>#{key[1]} {html.escape(any_row['prompt'])}</td>",
                _number_cell(key[2], str(key[2])),
            ]
            for run_number, (_, run_dir, _, _) in enumerate(evaluations):
                run = runs.get(run_number)
                if run is None:
                    cells.append("<td>missing</td>" + _number_cell(None, "-") * len(metrics))
                    continue
                source, alt = _link(run_dir / run["image"], report_dir), html.escape(run["image"], quote=True)
                gated = f"<br><small class='gated'>{_gated_caption(run)}</small>" if run.get("gated") else ""
                cells.append(f"<td><img src='{source}' alt='{alt}'>{gated}</td>")
                cells += [_number_cell(run.get(m), _fmt(run.get(m))) for m in metrics]
            row_key = html.escape(f"{key[0]}/{key[1]}/{key[2]}", quote=True)
            parts.append(f"<tr data-key='{row_key}'>{''.join(cells)}</tr>")
        parts.append("</tbody></table></section>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _run_line(name: str, run_dir: Path, summary: dict[str, Any]) -> str:
    """The paragraph that introduces one run: its overall means, protocol and what it lacks."""
    protocol = summary["protocol"]
    overall = ", ".join(f"{METRIC_LABELS[m]} {_fmt(summary['overall'].get(m))}" for m in summary["metrics"])
    facts = [
        f"{summary['images']} images",
        overall,
        f"metrics {html.escape(protocol['metric_set'])}, references {html.escape(protocol['references'])}",
    ]
    if "notes" in protocol:
        facts.append(f"<span class='warning'>{html.escape(protocol['notes']['warning'])}</span>")
    if summary.get("gate"):
        facts.append(f"<span class='warning gated'>{html.escape(gate_line(summary['gate']))}</span>")
    if summary["failed"]:
        facts.append(f"{len(summary['failed'])} failed")
    if summary["missing"]:
        facts.append(f"{len(summary['missing'])} missing")
    return f"<p><b>{html.escape(name)}</b> ({html.escape(str(run_dir))}): {'; '.join(facts)}</p>"


def _gated_caption(row: dict[str, Any]) -> str:
    attempts = row.get("gate_attempts")
    return f"gated: best DINO of {attempts} seed{'s' if attempts > 1 else ''}" if attempts else "gated"


def _number_cell(value: float | None, text: str) -> str:
    data = "" if value is None else f"{value:.6f}"
    return f"<td class='num' data-value='{data}'>{text}</td>"


def _sort_value(value: float | None) -> float:
    return float("inf") if value is None else value


def write_report(
    evaluations: Sequence[tuple[str, Path, dict[str, Any], Sequence[dict[str, Any]]]], run_dir: Path
) -> Path:
    """`run_dir/report.html`, atomically."""
    return outputs.atomic_write_text(
        outputs.safe_join(run_dir, outputs.REPORT_NAME), render_report(evaluations, run_dir)
    )
