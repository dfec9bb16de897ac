"""A corpus sampled from the teacher itself (sequence-level KD data): its responses to chat prompts and free-running
samples from BOS, batched with left padding, one KV-cached forward per new token.

    settings = SamplingSettings(temperature=1.0, top_p=0.95, max_new_tokens=256)
    rows = sample_responses(model, tokenizer, prompts, settings, batch_size=64)   # {"messages": [...], ...}
    rows = sample_free(model, tokenizer, 256, settings, batch_size=64)            # {"text": ..., ...}

Each batch draws from its own generator seeded by (seed, kind, batch index), so a sample does not depend on the
device's other work, and the same settings give the same corpus.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from .sources import Source


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # nucleus: the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_new_tokens < 1:
            raise ValueError(f"need top_k >= 0 and max_new_tokens >= 1 (got {self.top_k}, {self.max_new_tokens})")


def prompt_conversations(spec: dict | str, limit: int | None = None, cache_dir=None) -> list[list[dict]]:
    """The prompts of a chat source: each conversation's messages before its first assistant turn (those with
    a user message there), the first `limit` of them."""
    source = Source.from_spec(spec)
    if source.kind != "chat":
        raise ValueError(f"teacher prompts come from a chat source (messages or prompt/response), not {spec}")
    raw = source.load(cache_dir=cache_dir)
    prompts = []
    for conv in source.examples_to_conversations(raw[:] if limit is None else raw[: int(limit)]):
        first_reply = next((i for i, m in enumerate(conv) if m["role"] == "assistant"), len(conv))
        head = conv[:first_reply]
        if any(m["role"] == "user" for m in head):
            prompts.append(head)
    if not prompts:
        raise ValueError(f"prompt source {source.description} has no conversation that starts with a user turn")
    return prompts


def filtered_logits(logits: torch.Tensor, s: SamplingSettings) -> torch.Tensor:
    """Logits [B, V] scaled by 1 / temperature, with the tokens outside top-k and outside the top-p nucleus at -inf."""
    logits = logits / s.temperature
    if s.top_k:
        kth = logits.topk(min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely tokens: a token stays while that is < top_p
        sorted_logits = sorted_logits.masked_fill(before >= s.top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def _pick(logits: torch.Tensor, s: SamplingSettings, generator: torch.Generator) -> torch.Tensor:
    """Next token per row from fp32 logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(filtered_logits(logits, s).softmax(-1), 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample_batch(model, prompts: list[list[int]], s: SamplingSettings, *, pad_id: int, stop_ids: tuple[int, ...],
                 generator: torch.Generator) -> list[tuple[list[int], bool]]:
    """(new tokens, stopped) per prompt: left-padded prefill, then one token per step from the KV cache until
    every row has emitted a stop token (kept as its last token) or max_new_tokens."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    stop = torch.tensor(stop_ids or [-1], device=device)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                logits_to_keep=1)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new = []
    for _ in range(s.max_new_tokens):
        token = _pick(out.logits[:, -1].float(), s, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new.append(token)
        done = done | torch.isin(token, stop)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
    tokens = torch.stack(new, dim=1).tolist()
    results = []
    for row in tokens:
        end = next((i + 1 for i, t in enumerate(row) if t in stop_ids), None)
        results.append((row[:end] if end is not None else row, end is not None))
    return results


def _generator(model, seed: int, kind: int, batch: int) -> torch.Generator:
    g = torch.Generator(device=next(model.parameters()).device)
    g.manual_seed((int(seed) * 2 + kind) * 1_000_003 + batch)
    return g


def _batched(model, prompts: list[list[int]], s: SamplingSettings, batch_size: int, kind: int, pad_id: int,
             stop_ids: tuple[int, ...], progress: Callable[[int, int], None] | None):
    """sample_batch over prompts sorted by length (less padding), results in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list = [None] * len(prompts)
    for b, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        out = sample_batch(model, [prompts[i] for i in idx], s, pad_id=pad_id, stop_ids=stop_ids,
                           generator=_generator(model, s.seed, kind, b))
        for i, r in zip(idx, out):
            results[i] = r
        if progress is not None:
            progress(len(idx), sum(len(r[0]) for r in out))
    return results


def _pad_id(tokenizer) -> int:
    for i in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if i is not None:
            return int(i)
    return 0


def sample_responses(model, tokenizer, prompts: list[list[dict]], s: SamplingSettings, batch_size: int,
                     per_prompt: int = 1, progress=None) -> list[dict]:
    """The teacher's replies to chat prompts (rendered with the tokenizer's chat template and its generation prompt),
    `per_prompt` each: {"messages": prompt + [assistant reply], "prompt_index", "new_tokens", "finished"}."""
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    index = [i for i in range(len(prompts)) for _ in range(per_prompt)]
    stop = tuple(t for t in (tokenizer.eos_token_id,) if t is not None)
    results = _batched(model, [encoded[i] for i in index], s, batch_size, 0, _pad_id(tokenizer), stop, progress)
    rows = []
    for i, (new, finished) in zip(index, results):
        reply = tokenizer.decode(new[:-1] if finished else new, skip_special_tokens=True)
        rows.append({"messages": prompts[i] + [{"role": "assistant", "content": reply}], "prompt_index": i,
                     "new_tokens": len(new), "finished": finished})
    return rows


def sample_free(model, tokenizer, n: int, s: SamplingSettings, batch_size: int, stop_at_eos: bool = False,
                progress=None) -> list[dict]:
    """`n` free-running samples from BOS (EOS where the tokenizer has no BOS), decoded with their special tokens
    so that they tokenise back to the same kind of sequence: {"text", "new_tokens", "finished"}."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("free-running samples start from BOS (or EOS), and this tokenizer has neither")
    stop = (tokenizer.eos_token_id,) if stop_at_eos and tokenizer.eos_token_id is not None else ()
    results = _batched(model, [[start]] * n, s, batch_size, 1, _pad_id(tokenizer), stop, progress)
    return [{"text": tokenizer.decode([start] + new, skip_special_tokens=False), "new_tokens": len(new),
             "finished": finished} for new, finished in results]


class Throughput:
    """Progress callback: a tqdm bar over samples with new tokens per second in its postfix."""

    def __init__(self, total: int, desc: str):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="sample")
        self.tokens, self.start = 0, time.perf_counter()

    def __call__(self, samples: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(samples)
        self.bar.set_postfix(tok_s=f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):,.0f}")

    def close(self) -> float:
        self.bar.close()
        return time.perf_counter() - self.start
