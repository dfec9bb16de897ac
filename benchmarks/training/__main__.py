import sys

from benchmarks.training.run import main

sys.exit(0 if main() else 1)
