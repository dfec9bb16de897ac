"""Evaluation of teachers and exported hybrids (Lightning-free): held-out perplexity and KL to the teacher
(`heldout`), LM-Harness tasks through lm-eval on a model instance (`harness`), long-context perplexity and
passkey retrieval (`long_context`), plots (`plots`), and loading / input checks (`models`).

The entry point is `python -m zebra.eval.evaluate` (or `zebra.eval.evaluate.run_eval(cfg)` from Hydra).
"""
