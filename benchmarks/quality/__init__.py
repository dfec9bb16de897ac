"""Quality benchmark: how close the one-GPU recipe's hybrids come to their teacher, and its ablations.

    python -m benchmarks.quality                                  # GPU: the recipe + every ablation (see --only)
    python -m benchmarks.quality --only recipe,no_ild             # some runs; results merge into --out's JSON
    python -m benchmarks.quality --curve                          # KD for longer: held-out ppl against tokens
    python -m benchmarks.quality --smoke --out /tmp/quality.json  # model=tiny, random teacher, CPU, seconds

runs.py says what runs (the recipe `+experiment=smollm2_gpu`, the ablations as lists of Hydra overrides on top of
it), run.py runs them and is the command line, report.py makes the table, the target checks and the plot,
curve.py is the Lightning callback of the --curve mode.

Every run goes through zebra's own stage runners in this one process (zebra.stages.run.run on configs composed
with Hydra's compose API from zebra's config directory, as train.py composes them): stage=pipeline with the run's
stage.order, then stage=eval (zebra.eval.evaluate.run_eval, the metrics of zebra.eval.metrics). For each model:
perplexity and mean per-token KL(teacher || model) on (a) the held-out split of the training data ("sft") and
(b) zebra/data/shipped/heldout.txt ("text"), its KV cache fraction (measured from HybridCache), the tokens trained
to make it and the wall time of the stages that made it (their report.json). Models: the teacher, both ILD'd
students, the assembled hybrid before KD, the KD'd hybrid and the DPO'd hybrid of the recipe; the assembled and
KD'd hybrids of each ablation, whose KD has the recipe's token budget:
  no_ild     KD straight from the initialisation: the ILD stage runs one step at learning rate 0 (its scheduler
             runs.frozen_lr), so its exports are the initialised students (the init code is the stage's own); MLA
             at the recipe's SMART layers.
  uniform    MLA at floor(i * L / n) instead of SMART's choice, from the recipe's ILD'd students.
  init_*     the initialisation options (conf `init`, model.mla.rope_key) switched as a group: ILD + KD again at
             the recipe's SMART layers. A variant whose values are the recipe's own is not run again.
Runs that share an artifacts directory reuse each other's finished stages (the pipeline's config hashes).

Targets, for the recipe's 6-MLA / 24-Mamba2 hybrid on heldout.txt: perplexity <= 1.5 x the teacher's and KL <= 0.5
nats per token. The JSON is rewritten after every run (zebra.utils.files.write_json_atomic) and merged with the
results already in --out, so the runs can be spread over several device calls (--only).
"""
