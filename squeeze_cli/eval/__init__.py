"""`squeeze eval`: identity and text metrics for the images of a run, their summaries and report.

Modules: `protocol` (metric sets, model ids, preprocessing), `rundir` (what a run holds), `encoders`
(models through `from_pretrained`), `tiny` (random tiny metric checkpoints), `scoring` (per-image scores,
cache, summaries), `report` (terminal tables, report.html), `dreambench` (the DreamBench manifest).
"""
