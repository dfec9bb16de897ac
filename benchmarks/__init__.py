"""Benchmarks: print and save numbers (speed and memory are never asserted by timed tests)."""
