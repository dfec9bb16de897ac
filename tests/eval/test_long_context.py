"""Long-context checks at tiny lengths: perplexity vs context length, passkey prompts and scoring."""

import re

import pytest
import torch

from zebra.eval.long_context import (evaluate_long_context, long_text_ids, passkey_accuracy, passkey_prompt,
                                     perplexity_vs_length, plot_long_context)


@pytest.fixture(scope="module")
def models(tiny_run, tiny_teacher_dir):
    import zebra  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    return {"teacher": LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval(),
            "hybrid": AutoModelForCausalLM.from_pretrained(tiny_run / "2mla" / "dpo" / "model").eval()}


def test_perplexity_vs_length(models, smol_tokenizer):
    ids = long_text_ids(smol_tokenizer, 256)
    assert ids.numel() > 10000  # held-out prose + the shipped conversations
    for model in models.values():
        rows = perplexity_vs_length(model, ids, [32, 64, 128], windows=2)
        assert [r["length"] for r in rows] == [32, 64, 128]
        for r in rows:  # the same 256 tokens at every length
            n = 256 // r["length"]
            assert r["windows"] == n and r["tokens"] == n * (r["length"] - 1)
            assert r["perplexity"] > 1 and r["tail_perplexity"] > 1
    # one window scored whole equals the mean of its per-token NLLs
    from zebra.eval.long_context import token_nll

    nll = token_nll(models["hybrid"], ids[:64], chunk=16)
    with torch.no_grad():
        logits = models["hybrid"](ids[None, :64]).logits[0, :-1]
    ref = torch.nn.functional.cross_entropy(logits, ids[1:64], reduction="none")
    assert torch.allclose(nll, ref, atol=1e-4)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_prompt(smol_tokenizer, depth):
    ids, n = passkey_prompt(smol_tokenizer, 300, depth, 48213)
    assert 250 <= ids.numel() <= 300 and n > 5
    text = smol_tokenizer.decode(ids)
    assert text.count("48213") == 2 and text.rstrip().endswith("The pass key is")
    where = text.index("48213") / len(text)
    assert abs(where - depth) < 0.2


class KeyReader(torch.nn.Module):
    """A stand-in model that reads the key from its prompt: the passkey scoring must then say 100%."""

    def __init__(self, tokenizer, wrong=False):
        super().__init__()
        self.emb = torch.nn.Embedding(2, 2)
        self.tok, self.wrong = tokenizer, wrong

    def get_input_embeddings(self):
        return self.emb

    def generate(self, ids, max_new_tokens, **kw):
        key = re.search(r"pass key is (\d+)", self.tok.decode(ids[0])).group(1)
        answer = " 11111." if self.wrong else f" {key}. It"
        new = torch.tensor([self.tok(answer, add_special_tokens=False).input_ids])[:, :max_new_tokens]
        return torch.cat([ids, new], 1)


def test_passkey_scoring(smol_tokenizer):
    res = passkey_accuracy(KeyReader(smol_tokenizer), smol_tokenizer, [128, 256], depths=(0.0, 0.5, 1.0))
    assert res["accuracy"] == 1.0 and res["by_length"] == {"128": 1.0, "256": 1.0}
    assert len(res["trials"]) == 6 and all(t["prompt_tokens"] <= t["length"] for t in res["trials"])
    assert passkey_accuracy(KeyReader(smol_tokenizer, wrong=True), smol_tokenizer, [128])["accuracy"] == 0.0


def test_evaluate_long_context_and_plot(models, smol_tokenizer, tmp_path):
    res = evaluate_long_context(models, smol_tokenizer, lengths=[32, 64], passkey_lengths=[96], windows=1,
                                depths=(0.5,), log=lambda *_: None)
    for name in models:
        assert len(res["models"][name]["perplexity_vs_length"]) == 2
        trial = res["models"][name]["passkey"]["trials"][0]
        assert trial["length"] == 96 and isinstance(trial["correct"], bool)
    png = plot_long_context(res, tmp_path / "lc.png")
    assert png and (tmp_path / "lc.png").stat().st_size > 5000
