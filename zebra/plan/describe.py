"""`stage=describe`: build the hybrid on the meta device and report its size and cache, downloading nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from zebra.model import ZebraConfig, ZebraForCausalLM
from zebra.model.cache import measure_cache_bytes
from zebra.plan.chunks import chunk_rows
from zebra.plan.mixes import layer_types_for, resolve_mla_layers, uniform_layers
from zebra.utils.files import write_json_atomic


def _plain(obj):
    """OmegaConf node -> plain Python containers (no-op for dicts)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(obj):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a requirement
        pass
    return obj


def zebra_config_from_preset(model_cfg, layer_types: list[str]) -> ZebraConfig:
    """A ZebraConfig from a `conf/model` preset's `base` and `mla` blocks (architecture numbers, no download)."""
    base = dict(_plain(model_cfg["base"]))
    mla = dict(_plain(model_cfg["mla"]))
    return ZebraConfig(**base, **mla, hybrid_layer_types=layer_types)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Unique parameters (tied embeddings counted once); only those with requires_grad if `trainable_only`."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += getattr(p, "ds_numel", None) or p.numel()  # a ZeRO-3 partition counts as its whole tensor
    return total


def describe(cfg) -> dict:
    model_cfg, mix = cfg["model"], _plain(cfg["mix"])
    num_layers = int(model_cfg["base"]["num_hidden_layers"])
    smart_file = Path(cfg["paths"]["root"]) / model_cfg["name"] / "smart" / "sensitivity.json" \
        if "paths" in cfg else None
    placement = mix.get("selection", "explicit")
    if placement == "smart" and not (smart_file and smart_file.is_file()):
        # Size and cache depend only on how many layers are MLA, so describe works before SMART has run.
        mla_layers = uniform_layers(num_layers, mix.get("n_mla"))
        placement = "uniform (SMART output not found yet)"
    else:
        mla_layers = resolve_mla_layers(mix, num_layers, smart_file)
    config = zebra_config_from_preset(model_cfg, layer_types_for(num_layers, mla_layers))
    with torch.device("meta"):
        model = ZebraForCausalLM(config)
    cache = measure_cache_bytes(config, dtype=torch.bfloat16)
    info = {
        "model": model_cfg["name"],
        "mix": mix.get("name"),
        "params": count_parameters(model),
        "kv_fraction": round(cache["kv_fraction"], 8),
        "cache_bytes_per_token": cache["cache_bytes_per_token"],
        "cache_constant_bytes": cache["cache_constant_bytes"],
        "base_kv_bytes_per_token": cache["base_kv_bytes_per_token"],
        "mla_layers": mla_layers,
        "placement": placement,
        "layer_types": config.hybrid_layer_types,
    }
    opts = _plain(cfg.get("describe")) if hasattr(cfg, "get") else None
    if opts is not None:  # stage=describe (conf/stage/describe.yaml): memory plan and inference cache
        info["cache"] = cache_at_context(cache, int(opts.get("context") or 0), int(opts.get("cache_batch") or 1))
        info["memory"] = memory_estimate(cfg, config, opts)
        out = opts.get("out")
        if out:
            write_json_atomic(Path(out), info)
            info["written_to"] = str(out)
    return info


def print_description(cfg) -> dict:
    info = describe(cfg)
    print(json.dumps(info), flush=True)
    return info


# ------------------------------------------------------------------------------------------------ memory plan
# Bytes per parameter of the model states, per GPU, before sharding (DESIGN §5). Trained
# parameters under mixed-precision Adam:
#   DeepSpeed bf16 (zero2/zero3): bf16 weights 2 + bf16 gradients 2 + fp32 master weights 4 + Adam m, v 8
#       + ~2 of fp32 gradient partitions and communication buckets = ~18 (DeepSpeed's own ZeRO-3 figure).
#   Lightning bf16-mixed (single/ddp, torch autocast): fp32 weights 4 + fp32 gradients 4 + Adam m, v 8
#       + autocast's bf16 copies of the weights, cached for the forward, 2 = ~18.
# How each strategy places them (N = GPUs in the data-parallel group, L = the largest module's parameters, which
# ZeRO-3 gathers whole in bf16 with its gradient, 4 L, while it runs):
#   single, ddp     18 P on every GPU
#   zero2           4 P (bf16 weights + a full bf16 gradient before reduce-scatter) + 16 P / N    (DeepSpeed's
#                   ZeRO-2 estimate: optimizer states and gradients sharded, weights replicated)
#   zero3           18 P / N + 4 L
#   zero3_offload   2 P / N + 4 L on the GPU; fp32 master weights, gradients and Adam states, 16 P / N per
#                   process, in host memory
# Frozen student parameters (ILD's embeddings and LM head): their weights only (fp32 4 under ddp, bf16 2 under
# DeepSpeed, sharded under ZeRO-3). Frozen teachers / DPO reference: bf16 2 per parameter, replicated on every GPU
# (the default placement) or sharded / N in their own ZeRO-3 inference engine (describe.teacher_placement=zero3).
STRATEGIES = ("single", "ddp", "zero2", "zero3", "zero3_offload")
GIB = 2 ** 30


def model_state_bytes(strategy: str, trainable: int, frozen: int, devices: int, largest: int) -> dict:
    """Model-state bytes per GPU (and per process in host memory) of a student with `trainable` trained and
    `frozen` frozen parameters over `devices` GPUs; the arithmetic above."""
    n = max(1, int(devices))
    if strategy in ("single", "ddp"):
        gpu, cpu = 18 * trainable + 4 * frozen, 0
    elif strategy == "zero2":
        gpu, cpu = 4 * trainable + 16 * trainable / n + 2 * frozen, 0
    elif strategy == "zero3":
        gpu, cpu = 18 * trainable / n + 2 * frozen / n + 4 * largest, 0
    elif strategy == "zero3_offload":
        gpu, cpu = 2 * trainable / n + 2 * frozen / n + 4 * largest, 16 * trainable / n
    else:
        raise ValueError(f"describe.strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    return {"gpu": int(gpu), "cpu_per_process": int(cpu)}


def layer_activation_elements(config: ZebraConfig, kind: str) -> float:
    """Values one decoder layer keeps for backward, per token (an estimate from the dims, counting the tensors
    autograd saves; multiply by 2 bytes under bf16 autocast).

    Every layer: the two RMSNorms' inputs and outputs (4 H) and the SwiGLU MLP's gate, up, SiLU(gate) and their
    product (4 I).
    MLA: q_a output (r_q), q before and after RoPE (2 h (d_nope + d_rope)), the latent and shared RoPE key
    (r_kv + d_rope), kv_b output (g (d_nope + d_v)), K after RoPE (g (d_nope + d_rope)), the attention output
    (h d_v) and the softmax log-sum-exp (h, fp32 = 2 h). Fused (flash / memory-efficient) attention: no T x T
    scores are kept.
    Mamba2: in_proj output (2 d_inner + 2 d_xb + nheads), the conv's input, output and SiLU (3 conv_dim), x and B
    expanded to the heads (2 d_inner), dt after softplus (fp32, 2 nheads), the scan output, gate and gated-norm
    output (3 d_inner), and the fp32 chunk states (nheads headdim d_state per chunk_size tokens, x 2).
    """
    c = config
    h, g = c.num_attention_heads, c.num_key_value_heads
    common = 4 * c.hidden_size + 4 * c.intermediate_size
    if kind == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        mixer = (c.q_lora_rank + 2 * h * qk + c.kv_lora_rank + c.mla_rope_key_dim
                 + g * (c.qk_nope_head_dim + c.v_head_dim) + g * qk + h * c.v_head_dim + 2 * h)
    elif kind == "mamba":
        d_in, nh = c.mamba_d_inner, c.mamba_nheads
        mixer = ((2 * d_in + 2 * c.mamba_d_xb + nh) + 3 * c.mamba_conv_dim + 2 * d_in + 2 * nh + 3 * d_in
                 + 2 * nh * c.mamba_headdim * c.mamba_d_state / max(1, c.mamba_chunk_size))
    else:
        raise ValueError(f"unknown layer type {kind!r}")
    return float(common + mixer)


def model_activation_elements(config: ZebraConfig, checkpointing: bool) -> float:
    """Per token, a whole decoder stack: every layer's saved values, or with activation checkpointing each layer's
    input (H) plus one layer's values while it is recomputed in backward."""
    per_layer = [layer_activation_elements(config, t) for t in config.hybrid_layer_types]
    if checkpointing:
        return float(config.num_hidden_layers * config.hidden_size + max(per_layer))
    return float(sum(per_layer))


def llama_layer_peak_elements(base: dict) -> float:
    """Per token, what one Llama layer holds at once in a no-grad forward (teacher / reference): residual, normed
    input, Q, K, V, attention output and the MLP's gate, up and product."""
    hd = base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"]
    h, g = base["num_attention_heads"], base.get("num_key_value_heads") or base["num_attention_heads"]
    return float(2 * base["hidden_size"] + (2 * h + 2 * g) * hd + 3 * base["intermediate_size"])


def _llama_params(base: dict) -> tuple[int, int]:
    """(parameters, largest module's parameters) of a Llama built from a `model.base` block, on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**base))
    return count_parameters(model), _largest_module(model)


def _largest_module(model: torch.nn.Module) -> int:
    return max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)


def _teacher_base(cfg, spec: str) -> dict | None:
    """Architecture numbers of a teacher named by `spec`: a random KD teacher's `model.kd_teacher_base` preset,
    the preset's own base when it is the base (or random), else the base of the preset (conf/model/*.yaml) whose
    base it is; None when no preset names it."""
    from zebra.plan.presets import preset, preset_base, preset_names

    spec = str(spec)
    other = cfg["model"].get("kd_teacher_base")
    if other and spec == str(cfg["model"].get("kd_teacher")) and spec.startswith("random:"):
        return preset_base(str(other))
    if spec == str(cfg["model"]["teacher"]) or spec.startswith("random:"):
        return dict(_plain(cfg["model"]["base"]))
    for name in preset_names():
        node = preset(name)
        if str(node.get("teacher")) == spec and "base" in node:
            return preset_base(name)
    return None


def _strategy_name(cfg, devices: int) -> str:
    """ddp / zero2 / zero3 / zero3_offload / single from the composed `strategy` node."""
    node = _plain(cfg.get("strategy")) or {}
    target = str(node.get("_target_", ""))
    if target.endswith("DeepSpeedStrategy"):
        zero = (node.get("config") or {}).get("zero_optimization") or {}
        stage = int(zero.get("stage", node.get("stage", 2)))
        offload = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None) \
            or bool(node.get("offload_optimizer"))
        if stage == 3:
            return "zero3_offload" if offload else "zero3"
        return "zero2"
    if target.endswith("DDPStrategy") or node.get("name") in ("ddp", "ddp_spawn"):
        return "ddp"
    if node.get("name") == "single_device":
        return "single"
    return "ddp" if devices > 1 else "single"


def _stage_shapes(cfg, stage: str) -> tuple[int, int, bool]:
    """(micro-batch sequences, sequence length, activation checkpointing) of a training stage's config."""
    sc = cfg.get(stage) or {}
    if stage == "dpo":  # chosen and rejected of every pair go through the policy
        return 2 * int(sc.get("batch_size", 1)), int(sc.get("max_length", 1024)), bool(sc.get("gradient_checkpointing"))
    return int(sc.get("batch_size", 1)), int(sc.get("seq_len", 2048)), bool(sc.get("gradient_checkpointing"))


def _device_total(cfg) -> int:
    trainer = cfg.get("trainer") or {}
    devices, nodes = trainer.get("devices", 1), int(trainer.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    return nodes


def memory_estimate(cfg, config: ZebraConfig, opts: dict) -> dict:
    """Per-GPU memory of one training stage (`describe.train_stage`) before launching it: model states for the
    strategy and device count, the frozen teacher, activations per micro-batch, the loss's workspace. Bytes;
    `per_gpu_gib` sums them up. An estimate: CUDA context, allocator fragmentation and NCCL buffers come on top
    (hence the 10% headroom of `fits`)."""
    stage = str(opts.get("train_stage") or "kd")
    if stage not in ("ilkd", "kd", "dpo"):
        raise ValueError(f"describe.train_stage must be ilkd, kd or dpo, got {stage!r}")
    devices = int(opts.get("devices") or _device_total(cfg))
    strategy = str(opts.get("strategy") or _strategy_name(cfg, devices))
    micro, seq, ckpt = _stage_shapes(cfg, stage)
    if stage == "dpo" and opts.get("micro_batch"):
        micro = 2 * int(opts["micro_batch"])
    elif opts.get("micro_batch"):
        micro = int(opts["micro_batch"])
    seq = int(opts.get("seq_len") or seq)
    if opts.get("activation_checkpointing") is not None:
        ckpt = bool(opts["activation_checkpointing"])
    tokens = micro * seq
    base = dict(_plain(cfg["model"]["base"]))
    H, V = config.hidden_size, config.vocab_size
    act_bytes = 2  # bf16 under autocast / DeepSpeed bf16

    # students and what they keep for backward
    if stage == "ilkd":
        kinds = ("mla", "mamba") if str((cfg.get("ilkd") or {}).get("students", "both")) == "both" \
            else (str(cfg["ilkd"]["students"]),)
        trainable = frozen = largest = 0
        act = 0.0
        for kind in kinds:
            student_cfg = zebra_config_from_preset(cfg["model"], [kind] * config.num_hidden_layers)
            with torch.device("meta"):
                student = ZebraForCausalLM(student_cfg)
            emb = student.get_input_embeddings().weight.numel()
            head = 0 if student_cfg.tie_word_embeddings else student.get_output_embeddings().weight.numel()
            total = count_parameters(student)
            trainable += total - emb - head
            frozen += emb + head
            largest = max(largest, max(_largest_module(layer) for layer in student.model.layers))
            act += model_activation_elements(student_cfg, ckpt)
        teacher_spec = str(cfg["model"]["teacher"])
        # teacher hidden states entering every layer (+ the final norm's) and every attention output (mixer loss)
        teacher_kept = (2 * config.num_hidden_layers + 1) * base["hidden_size"]
        loss_workspace = 0
    else:
        with torch.device("meta"):
            hybrid = ZebraForCausalLM(config)
        trainable, frozen, largest = count_parameters(hybrid), 0, _largest_module(hybrid)
        act = model_activation_elements(config, ckpt) + H  # + the final norm's output
        if stage == "kd":
            teacher_spec = str(cfg["model"].get("kd_teacher") or cfg["model"]["teacher"])
            teacher_kept = None  # the teacher's final hidden states, from its base below
            chunk = int(((cfg.get("kd") or {}).get("module") or {}).get("chunk_size") or chunk_rows(V))
            # per vocabulary chunk ~4 fp32 [chunk, V] buffers (logits, log-softmaxes, gradient); the LM head's fp32
            # gradient accumulator [V, H]; the hidden-state gradient [tokens, H]
            loss_workspace = 4 * 4 * min(chunk, tokens) * V + 4 * V * H + act_bytes * tokens * H
        else:  # dpo: the reference is a frozen copy of the policy
            teacher_spec, teacher_kept, loss_workspace = "reference (frozen copy of the policy)", 0, 0

    states = model_state_bytes(strategy, trainable, frozen, devices, largest)

    # the frozen teacher (bf16) and its forward
    if stage == "dpo":
        teacher_params, teacher_base = trainable, None
        teacher_peak = model_activation_elements(config, True)  # no grad: about one layer at a time
    else:
        teacher_base = _teacher_base(cfg, teacher_spec)
        if teacher_base is not None:
            teacher_params, _ = _llama_params(teacher_base)
            teacher_peak = llama_layer_peak_elements(teacher_base)
            if teacher_kept is None:
                teacher_kept = teacher_base["hidden_size"]
        else:
            teacher_params = int(opts.get("teacher_params") or 0) or None
            teacher_peak, teacher_kept = 0.0, teacher_kept or 0
    placement = str(opts.get("teacher_placement") or "replicated")
    if placement not in ("replicated", "zero3"):
        raise ValueError(f"describe.teacher_placement must be replicated or zero3, got {placement!r}")
    teacher_bytes = None if teacher_params is None else \
        int(2 * teacher_params / (devices if placement == "zero3" else 1))

    activations = int(act_bytes * tokens * act)
    teacher_activations = int(act_bytes * tokens * (teacher_kept + teacher_peak))
    parts = {"model_states": states["gpu"], "teacher": teacher_bytes or 0, "activations": activations,
             "teacher_activations": teacher_activations, "loss_workspace": int(loss_workspace)}
    total = sum(parts.values())
    out = {
        "train_stage": stage, "strategy": strategy, "devices": devices, "micro_batch": micro, "seq_len": seq,
        "activation_checkpointing": ckpt, "trainable_params": int(trainable), "frozen_student_params": int(frozen),
        "largest_module_params": int(largest), "teacher": teacher_spec, "teacher_params": teacher_params,
        "teacher_placement": placement, "bytes_per_gpu": parts, "total_bytes_per_gpu": int(total),
        "cpu_bytes_per_process": states["cpu_per_process"],
        "per_gpu_gib": {k: round(v / GIB, 2) for k, v in {**parts, "total": total}.items()},
    }
    if teacher_params is None:
        out["note"] = (f"teacher {teacher_spec!r} is not the base of any conf/model preset: its bytes are not "
                       "counted (set describe.teacher_params)")
    if opts.get("gpu_memory_gb"):
        capacity = float(opts["gpu_memory_gb"]) * 1e9
        out["gpu_memory_bytes"] = int(capacity)
        out["fits"] = bool(total * 1.1 <= capacity)
    return out


def cache_at_context(cache: dict, context: int, batch: int = 1) -> dict:
    """Inference cache of the hybrid (bf16) at `context` tokens for `batch` sequences, and the base's KV cache."""
    hybrid = batch * (cache["cache_bytes_per_token"] * context + cache["cache_constant_bytes"])
    base = batch * cache["base_kv_bytes_per_token"] * context
    return {"context": context, "batch": batch, "hybrid_bytes": int(hybrid), "base_kv_bytes": int(base),
            "hybrid_gib": round(hybrid / GIB, 3), "base_kv_gib": round(base / GIB, 3)}
