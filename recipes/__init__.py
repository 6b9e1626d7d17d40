# The packaged presets (data only); their code is squeeze_cli/manifest/recipes.py.
