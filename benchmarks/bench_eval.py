"""A cached `squeeze eval` of a finished run of N images: time, CPU time and peak memory.

    python benchmarks/bench_eval.py [--images 3000] [--png-px 512] [--reference-kb 300] [--runs 3]
        [--verify] [--work DIR] [--json FILE]

It writes a finished run with `bench_resume.write_finished` (the copying fixture: one PNG of `--png-px`²
hard-linked under every job's name, each with its real sidecar; references are JPEG photos of about
`--reference-kb`), runs `squeeze gen` on it once (all done: it writes the index, the resolved manifest and
`.squeeze-references.json`), fills the score cache with one `squeeze eval --metrics tiny` (timed once),
then times `--runs` cached evals (`--no-report`) as fresh processes, median of each, and checks that
each computed nothing. With `--verify`, one cached `eval --verify` too (every image hashed and checked).

The fixture's PNGs share one inode, so every read is served from the page cache: the times are the CPU
cost of reading (sha256, the PNG chunk walk), not of a disk, which a real run of distinct files adds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from bench_plan import write_manifest  # benchmarks/: the script's own folder is on sys.path
from bench_resume import median_process, timed_process, write_finished

from squeeze_cli import outputs

EVAL_FLAGS = ["--metrics", "tiny", "--no-report"]


def computed(out: Path) -> int:
    """How many scores the last eval of `out` computed (its metrics.json)."""
    return json.loads((out / outputs.METRICS_JSON_NAME).read_text())["cache"]["computed"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--png-px", type=int, default=512)
    parser.add_argument("--reference-kb", type=int, default=300)
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--seeds-per-prompt", type=int, default=10)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--verify", action="store_true", help="also time one cached `eval --verify`")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the run here and reuse it (and its score cache) next time; a temporary folder by default",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    squeeze = [sys.executable, "-m", "squeeze_cli"]
    report: dict = {"images": args.images, "png_px": args.png_px, "load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.work or Path(tmp)
        out = folder / "out"
        if not (folder / "written").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            path = write_manifest(
                folder,
                args.images,
                subjects=args.subjects,
                seeds_per_prompt=args.seeds_per_prompt,
                reference_kb=args.reference_kb,
            )
            written = write_finished(path, out, args.png_px)
            views_off = ["--set", "output.grids=false", "--set", "output.contact_sheet=false"]
            timed_process([*squeeze, "gen", str(path), "--out", str(out), "--quiet", *views_off])
            fill_wall, _, fill_cpu = timed_process([*squeeze, "eval", str(out), *EVAL_FLAGS])
            print(
                f"{written} images; the first eval (fills the cache): {fill_wall:.1f} s, CPU {fill_cpu:.1f} s"
            )
            (folder / "written").write_text(str(written))
        cached = median_process([*squeeze, "eval", str(out), *EVAL_FLAGS], args.runs)
        if computed(out):
            raise RuntimeError(f"the cached eval computed {computed(out)} scores: the cache keys changed")
        report["cached_eval"] = cached
        print(
            f"cached eval of {(folder / 'written').read_text()} images: {cached['median_s']:.2f} s "
            f"({cached['min_s']:.2f}-{cached['max_s']:.2f}), CPU {cached['cpu_median_s']:.2f} s "
            f"({cached['cpu_min_s']:.2f}-{cached['cpu_max_s']:.2f}), {cached['peak_rss_mib']:.0f} MiB",
            flush=True,
        )
        if args.verify:
            verify = median_process([*squeeze, "eval", str(out), *EVAL_FLAGS, "--verify"], args.runs)
            report["cached_eval_verify"] = verify
            print(
                f"cached eval --verify: {verify['median_s']:.2f} s, CPU {verify['cpu_median_s']:.2f} s, "
                f"{verify['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    report["load_average_after"] = os.getloadavg()
    print(f"load average before {report['load_average_before']}, after {report['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
