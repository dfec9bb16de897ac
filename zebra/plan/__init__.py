"""Planning without training: which layers are MLA (mixes), model presets, FLOPs per token, and `describe`
(parameters, KV cache and a per-GPU memory plan, built on the meta device)."""
