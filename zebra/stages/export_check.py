"""The export check (`export_check: true`): the finished export loaded back with `from_pretrained` as a user would,
its logits on a probe batch compared with the in-memory model's."""

from __future__ import annotations

from pathlib import Path

import torch


def probe_reference(model, probe: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probe ids, the in-memory model's logits on them). Collective under ZeRO-3."""
    ids = probe_ids(probe, model.config.vocab_size)
    return ids, model_logits(model, ids)


def probe_ids(batch: dict | None, vocab_size: int, length: int = 128) -> torch.Tensor:
    """The first row of `batch` (at most `length` tokens), else a fixed id sequence."""
    if batch is not None:
        return batch["input_ids"][:1, :length].clone()
    return (torch.arange(length) * 7919 % vocab_size)[None]


def model_device(model) -> torch.device:
    """Where `model` computes: its partitions' device under ZeRO-3 (the parameters themselves are empty
    placeholders there), else its embedding's."""
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.device
        break
    return model.get_input_embeddings().weight.device


@torch.no_grad()
def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(input_ids=ids.to(model_device(model)), use_cache=False).logits.float().cpu()
    finally:
        model.train(was)


def param_dtypes(model) -> dict[str, torch.dtype]:
    return {n: p.dtype for n, p in model.named_parameters(remove_duplicate=False)}


def compare_export(dst: Path | str, ids: torch.Tensor, reference: torch.Tensor, model) -> dict:
    """Load the export at `dst` with `from_pretrained` and compare its logits on `ids` with `reference` (the
    in-memory model's).

    The loaded copy is given the in-memory model's dtype of every tensor, so that both compute alike: a
    mixed-precision run holds its trained weights in fp32 beside bf16 frozen ones (DeepSpeed's ZeRO-1/2 casts
    only the frozen parameters to bf16), which no single `dtype=` reproduces. `equal` is bitwise equality;
    `match` allows the rounding of one dtype conversion (1e-3 of the logits' scale) with identical argmax."""
    from transformers import AutoModelForCausalLM

    dtypes = param_dtypes(model)

    def as_in_memory(m):
        with torch.no_grad():
            for name, p in m.named_parameters(remove_duplicate=False):
                if name in dtypes and p.dtype != dtypes[name]:
                    p.data = p.data.to(dtypes[name])
        return m

    # read in fp32 on the CPU, cast tensor by tensor, then moved (the GPU never holds an fp32 copy of a bf16
    # model); cast again after the move, whose module hooks keep the SSM parameters in >= fp32
    loaded = as_in_memory(as_in_memory(AutoModelForCausalLM.from_pretrained(str(dst), dtype=torch.float32))
                          .to(model_device(model)))
    logits = model_logits(loaded, ids)
    del loaded
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    diff = (logits - reference).abs()
    counts: dict[str, int] = {}
    for dt in dtypes.values():
        key = str(dt).replace("torch.", "")
        counts[key] = counts.get(key, 0) + 1
    out = {"tokens": int(ids.numel()), "dtype": max(counts, key=counts.get), "tensor_dtypes": counts,
           "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "reference_abs_max": float(reference.abs().max()),
           "argmax_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
           "equal": bool(torch.equal(logits, reference))}
    out["match"] = out["equal"] or (out["argmax_agreement"] == 1.0
                                    and out["max_abs_diff"] <= 1e-3 * max(1.0, out["reference_abs_max"]))
    return out
