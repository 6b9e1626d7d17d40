"""`squeeze eval`: identity and text metrics for the images of a run, their summaries and report.

Modules: `rundir` (what a run holds), `scoring` (per-image scores, cache, summaries), `report` (terminal
tables, report.html), `gated` (runs made with `gen`'s identity gate), `dreambench` (the DreamBench
manifest). The metric models and the protocol live one floor down, in `squeeze_cli/metrics/` (shared with
`gen`'s identity gate).
"""
