"""zebra's Hydra configs, installed as the package data `zebra.conf` (see pyproject.toml)."""
