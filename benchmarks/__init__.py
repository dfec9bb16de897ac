"""Benchmarks: print and save numbers (speed and memory are never asserted by timed tests).

`python -m benchmarks.<name>` from the repository root, each with `--smoke --device cpu` to check the code:
generation and training (packages: models.py builds, run.py measures and is the command line, report.py makes the
summary and plots), quality (runs.py says what runs, `--smoke` alone on CPU), layers and kd_loss (one module each); harness.py holds what they share (device, timing,
errors, the card's ceilings, versions). Results and the commands that made them: experiments/.
"""
