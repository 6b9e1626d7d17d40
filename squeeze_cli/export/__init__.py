"""`squeeze export`: a run's finished images as a dataset `datasets` loads (imagefolder, parquet,
webdataset), selected by a `--where` expression and subjects, split by subject, with a dataset card.

Modules: `rows` (the run's finished images of its current plan as rows, with their `squeeze eval`
scores; splits by subject), `where` (the `--where` expression language), `formats` (the three formats'
part writers), `card` (the dataset card), `folder` (`export_run`: the export folder, incremental and
crash-safe).
"""
