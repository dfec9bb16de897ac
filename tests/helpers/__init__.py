"""Helpers that tests in several directories use: `runs` (train.py in subprocesses, tiny data, step traces) and
`configs` (the project's Hydra config composed with overrides)."""
