"""The two kinds of held-out data that perplexity and KL(teacher || model) are measured on (zebra.eval.metrics).

- "text": plain prose (zebra/data/shipped/heldout.txt by default, or any file), cut into rows of `seq_len`
  tokens, each a batch of its own (zebra.compose.report's rows, shared with the untrained-student report).
- "sft": the held-out split of the token mixture (chat conversations formatted with the chat template, packed with
  document boundaries), the split the KD stage measures its held-out KL on. Every model sees the packed rows as
  separate documents (the teacher through a block-causal mask, the hybrid through its position ids), and only the
  positions of the batch's loss_mask count.
"""

from __future__ import annotations

from pathlib import Path

from zebra.compose.report import held_out_text, token_rows

HELDOUT_SETS = ("text", "sft")


def text_rows(tokenizer, text: str | Path | None = None, seq_len: int = 512,
              max_tokens: int | None = 4096) -> tuple[list[dict], str]:
    """Rows of the held-out text as batches ({"input_ids": [1, <=seq_len]}) and where the text came from."""
    if isinstance(text, str) and Path(text).is_file():
        text = Path(text)
    body, source = held_out_text(text)
    rows = token_rows(tokenizer, body, seq_len, max_tokens)
    if not rows:
        raise ValueError(f"the held-out text ({source}) is too short to score")
    return rows, source


def sft_batches(tokenizer, data_cfg=None, seq_len: int = 512, batch_size: int = 2,
                max_batches: int | None = 8) -> tuple[list[dict], str]:
    """Batches of the token mixture's held-out split. `data_cfg`: a `data.sft` config node (Hydra, instantiated
    with the split and shapes), or None for the shipped mixture with its default split (conf/data/default.yaml)."""
    if data_cfg is not None:
        from hydra.utils import instantiate

        dm = instantiate(data_cfg, tokenizer=tokenizer, split="heldout", seq_len=int(seq_len),
                         batch_size=int(batch_size))
        names = [str(s.get("path") or s.get("name")) for s in data_cfg.get("sources", [])]
        source = f"data.sft ({', '.join(names)}, held-out split)"
    else:
        from zebra.data.sft import TokenMixtureDataModule

        dm = TokenMixtureDataModule(tokenizer=tokenizer, split="heldout", seq_len=int(seq_len),
                                    batch_size=int(batch_size))
        source = "shipped:sft (held-out split, seed 42, 5%)"
    batches = []
    for i, batch in enumerate(dm.heldout_dataloader(batch_size=int(batch_size))):
        if max_batches is not None and i >= int(max_batches):
            break
        batches.append(batch)
    if not batches:
        raise ValueError(f"the held-out split of {source} is empty")
    return batches, source
