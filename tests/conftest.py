"""Shared pytest set-up: the markers every test directory uses (DESIGN.md §6)."""


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (run on the lent GPU with -m gpu)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
    config.addinivalue_line("markers", "slurm: starts a real single-node Slurm")
