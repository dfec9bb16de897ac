"""zebra.eval.metrics against float64 references written from the definitions: perplexity and KL(teacher || model)
from full logits, packed rows == their documents run alone (the teacher through the packed mask), chunking."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from zebra.compose.students import build_student
from zebra.eval.metrics import heldout_kl, score_batches
from zebra.model.packing import packed_attention_mask

V = 61


def tiny_llama(seed=0, attn="sdpa"):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(30)  # distributions far from uniform
    return model


def reference(model, teacher, docs):
    """(mean NLL, mean KL) over every position but the last of each document, each run alone, full logits."""
    nll = kl = n = 0.0
    with torch.no_grad():
        for ids in docs:
            lq = F.log_softmax(model(ids).logits[0, :-1].double(), -1)
            lp = F.log_softmax(teacher(ids).logits[0, :-1].double(), -1)
            nll -= float(lq.gather(-1, ids[0, 1:, None]).sum())
            kl += float((lp.exp() * (lp - lq)).sum())
            n += ids.shape[1] - 1
    return nll / n, kl / n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_score_as_their_documents(attn):
    teacher, model = tiny_llama(0, attn), tiny_llama(1, attn)
    torch.manual_seed(2)
    doc_a, doc_b = torch.randint(3, V, (1, 9)), torch.randint(3, V, (1, 6))
    ids = torch.cat([doc_a, doc_b, torch.zeros(1, 4, dtype=torch.long)], 1)
    batch = {"input_ids": ids, "position_ids": torch.cat([torch.arange(9), torch.arange(6), torch.arange(4)])[None],
             "attention_mask": torch.cat([torch.ones(1, 15), torch.zeros(1, 4)], 1).long(),
             "loss_mask": torch.zeros(1, 19, dtype=torch.bool)}
    batch["loss_mask"][0, 0:8] = True  # a piece's last token has no target in its row
    batch["loss_mask"][0, 9:14] = True
    nll, kl = reference(model, teacher, [doc_a, doc_b])
    got = score_batches(model, teacher, [batch])
    assert got["tokens"] == 13
    assert got["nll"] == pytest.approx(nll, rel=1e-8)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-8)
    assert got["kl_to_teacher"] == pytest.approx(kl, rel=1e-8) and kl > 0.01
    assert heldout_kl(model, teacher, [batch], chunk=4) == pytest.approx(kl, rel=1e-8)  # chunks of 4 rows
    alone = score_batches(teacher, teacher, [batch])
    assert "kl_to_teacher" not in alone


def test_hybrid_student_scores_as_its_documents():
    teacher = tiny_llama(0)
    student, _ = build_student(teacher, {"q_lora_rank": 16, "kv_lora_rank": 8}, "mamba")
    student = student.double().eval()
    torch.manual_seed(3)
    doc_a, doc_b = torch.randint(3, V, (1, 7)), torch.randint(3, V, (1, 8))
    packed = {"input_ids": torch.cat([doc_a, doc_b], 1),
              "position_ids": torch.cat([torch.arange(7), torch.arange(8)])[None]}
    loss_mask = torch.ones(1, 15, dtype=torch.bool)
    loss_mask[0, [6, 14]] = False  # the last token of each document
    separate = score_batches(student, teacher, [{"input_ids": doc_a}, {"input_ids": doc_b}])
    together = score_batches(student, teacher, [{**packed, "loss_mask": loss_mask}])
    assert together["tokens"] == separate["tokens"] == 13
    assert together["kl_to_teacher"] == pytest.approx(separate["kl_to_teacher"], rel=1e-8)
    assert together["nll"] == pytest.approx(separate["nll"], rel=1e-8)


def test_modes_restored_and_no_tokens():
    teacher, model = tiny_llama(0), tiny_llama(1)
    model.train()
    empty = {"input_ids": torch.randint(3, V, (1, 5)), "loss_mask": torch.zeros(1, 5, dtype=torch.bool)}
    assert heldout_kl(model, teacher, [empty]) is None
    with pytest.raises(ValueError, match="no counted tokens"):
        score_batches(model, teacher, [empty])
    score_batches(model, teacher, [{"input_ids": torch.randint(3, V, (1, 5))}])
    assert model.training and not teacher.training


def test_packed_mask_is_block_causal():
    pos, pad = torch.tensor([[0, 1, 0, 1, 2]]), torch.tensor([[1, 1, 1, 1, 0]])
    allowed = packed_attention_mask(pos, pad)[0, 0]
    # pads are hidden as keys; a pad query still sees its document (its row is never empty) but never counts
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]],
                            dtype=torch.bool)
    assert torch.equal(allowed, expected)
    additive = packed_attention_mask(pos, pad, torch.float32, "eager")[0, 0]
    assert torch.equal(additive == 0, expected) and additive.min() == torch.finfo(torch.float32).min
    padded_only = packed_attention_mask(None, pad)[0, 0]
    assert torch.equal(padded_only, torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0],
                                                  [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))
    assert packed_attention_mask(torch.arange(4).repeat(2, 1), torch.ones(2, 4)) is None
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed_attention_mask(pos, pad, torch.float32, "flash_attention_2")
