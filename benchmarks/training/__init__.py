"""Training throughput benchmark: the `kd` and `ilkd` steps at zebra_1b shapes on one GPU (random weights).

    python -m benchmarks.training                                          # GPU: zebra_1b, 8B KD teacher, seq 2048
    python -m benchmarks.training --smoke --device cpu --out /tmp/tb.json  # tiny shapes, same code path

models.py builds the configs, models, optimizer and batches; run.py measures (and is the command line);
report.py makes the summary and the log lines; timing and device handling are benchmarks/harness.py.

What runs is the stages' own code, without a Lightning Trainer:
- kd: student = ZebraForCausalLM (conf/model/zebra_1b.yaml, conf/mix/paper.yaml: MLA at [0, 5, 10, 14]) with
  fp32 master weights under bf16 autocast (trainer=gpu is precision bf16-mixed) and torch.optim.AdamW(fused=True);
  teacher = a LlamaForCausalLM of Llama-3.1-8B's dims (conf/model/zebra_8b.yaml `base`), bf16, frozen. The step is
  `zebra.stages.kd.KDModule`'s: `teacher.teacher_forward`, `kd.student_hidden`, `losses.chunked_kd_loss` (the
  benchmark checks that its loss equals `KDModule.kd_loss` on the same batch). Timed with CUDA events per phase
  (no host sync added): teacher_forward (body, no logits) | student_forward | kd_loss (both models' logits chunk
  by chunk, the student's logit gradients pushed through its LM head) | student_backward | optimizer.
  "student_step" = student_forward + kd_loss + student_backward; its TFLOP/s counts the student's 6 x params
  (+ attention, SSD) and the teacher's logits, which the loss computes (also reported without them). A second
  measurement runs `KDModule.training_step` itself (its host syncs included); a third a packed batch
  (--docs documents per row, position ids restarting: the block-causal path of real data).
- ilkd: teacher = Llama-3.2-1B's dims (zebra_1b `base`), students = all-MLA and all-Mamba2 ZebraForCausalLM
  (random, no SVD init), `zebra.stages.ilkd.ILDModule.training_step`: (a) both students from one teacher forward,
  (b) two separate runs, one student each with its own teacher forward, at the same per-student micro-batch.
- The micro-batch is the largest of 1, 2, 4, 8, ... whose step fits without activation checkpointing (kd: the
  split step; ilkd: the joint step, whose micro-batch the separate runs reuse).
- FLOPs per token from `zebra.plan.flops` (teacher forward + 3 x student forward, attention and SSD included);
  MFU = model FLOPs per second / the bf16 matmul rate measured at the start (best of square GEMMs).

On CUDA each measurement also counts the host syncs of one step and where they come from
(torch.cuda.set_sync_debug_mode("warn")). Toggles for hypotheses: --packed/--no-packed, --kernels torch|mamba_ssm,
--precision bf16 (bf16 student weights, no autocast), --kd-chunk-size, --batch.

Every measurement prints one line and is written to the JSON at once (zebra.utils.files.write_json_atomic), with the
device, versions, kernel backend, configs and micro-batches. Speed is never asserted (DESIGN §6).
"""
