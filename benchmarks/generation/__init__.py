"""Generation benchmark: the hybrid (ZebraForCausalLM, zebra_8b paper mix) against its Llama-3.1-8B-shaped base
(transformers' LlamaForCausalLM), random weights of the real shapes, bf16, one CUDA GPU, one model at a time.

    python -m benchmarks.generation                                            # GPU (~3-5 min on an H100)
    python -m benchmarks.generation --smoke --device cpu --out /tmp/gen.json   # tiny shapes, checks the code
    python -m benchmarks.generation --plot experiments/generation/generation_bench.json   # the plots, on CPU

models.py builds the two models and their static caches, run.py measures (and is the command line), report.py
turns the results into the summary and the plots; timing and device handling are benchmarks/harness.py.

Per model, in this order (the JSON is rewritten after every measurement, so a timeout still leaves results):
  check     graph-replayed static-cache decode against the ordinary eager decode (dynamic cache) on a short
            prompt: relative logit error and greedy-token agreement.
  cache     cache bytes per token from allocator deltas (torch.cuda.memory_allocated around creating the static
            cache at two lengths; tensor sizes on CPU). The hybrid's constant part (Mamba2 conv + SSM states)
            is per sequence and reported separately.
  prefill   chunked prefill into a static cache (logits_to_keep=1), batch 8, at each context; CUDA-event timed,
            peak memory (max_memory_allocated, reset per measurement).
  decode    batch 8 at each context over a static cache filled with random values at that length (no prefill):
            a one-token greedy step (argmax fed back on the device, position advanced in place) recorded in a
            CUDA graph and replayed; median step time over the timed replays; once per decode-attention kernel
            ("matmul", "sdpa": zebra.model.ops.decode_attention, used by both models), best reported.
  max batch the largest batch whose cache and captured decode step fit at the longest context (grow x2, then
            bisect), and decode tokens/s there.
  roofline  bytes a decode step must move (every weight once, the whole static cache read, the Mamba2 states
            written back) over the measured device copy bandwidth (2 x bytes / time of a large copy): the
            achieved fraction is reported for both models, and the ratios are flagged unreportable when the
            base is below 60% of its roofline.

Both models run the same harness and the same capture: a manual torch.cuda.CUDAGraph of one decode step with
static input buffers (warm-up on a side stream first; with --compile the step goes through torch.compile before
it). The base decodes through transformers' StaticCache
(which writes at its own device-side length) with a prepared 4D mask over the slots; its attention function
is registered with transformers' AttentionInterface: prefill goes to transformers' own SDPA attention, a
one-token step to the same decode attention the hybrid's absorbed MLA uses (transformers' SDPA path would
otherwise copy the whole KV cache to 32 heads every step, repeat_kv).
"""

