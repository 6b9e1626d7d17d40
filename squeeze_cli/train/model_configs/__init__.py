"""Configs (config.json contents) of the full-size models, for `squeeze train --dry-run` offline."""
