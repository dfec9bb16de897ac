"""Each training stage's loss falls on a fixed batch (tiny random base, CPU, seconds)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from zebra.compose.students import assemble_hybrid, build_student
from zebra.model.packing import position_ids_from_doc_lengths
from zebra.stages.optim import param_groups, warmup_cosine
from zebra.stages.teacher import load_teacher_model, teacher_forward
from zebra.stages.dpo import DPOModule
from zebra.stages.ilkd import ILDModule
from zebra.stages.kd import KDModule

CONF = Path(__file__).resolve().parents[2] / "conf"
TINY = OmegaConf.load(CONF / "model" / "tiny.yaml")


@pytest.fixture(scope="module")
def teacher():
    return load_teacher_model("random:0", TINY.base).model


@pytest.fixture(scope="module")
def students(teacher):
    kw = OmegaConf.to_container(TINY.mla)
    return {k: build_student(teacher, kw, kind=k)[0] for k in ("mla", "mamba")}


def packed_batch(seed=0, b=2, t=24, vocab=49152):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    pos = position_ids_from_doc_lengths([[10, 14], [24]], t)
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 20:] = 0  # a padded tail
    pos[1, 20:] = torch.arange(4)
    loss = torch.ones(b, t, dtype=torch.bool)
    loss[0, [9, 23]] = False
    loss[1, 19:] = False
    return {"input_ids": ids, "position_ids": pos, "attention_mask": attn, "loss_mask": loss}


def overfit(loss_fn, params, steps=12, lr=3e-3):
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("which", ["both", "mla", "mamba"])
def test_ilkd_loss_falls(teacher, students, which):
    kinds = ("mla", "mamba") if which == "both" else (which,)
    module = ILDModule({k: copy.deepcopy(students[k]) for k in kinds}, teacher)
    batch = packed_batch()
    params = [p for p in module.parameters() if p.requires_grad]
    losses = overfit(lambda: sum(module.ild_losses(batch).values()), params)
    assert losses[-1] < 0.7 * losses[0], losses
    # frozen: embeddings and LM head; the final norm trains under the normed target
    for s in module.students.values():
        assert not s.model.embed_tokens.weight.requires_grad and not s.lm_head.weight.requires_grad
        assert s.model.norm.weight.requires_grad
    assert "teacher" not in dict(module.named_children())  # never checkpointed, never handed to DDP


def test_ilkd_unnormed_freezes_final_norm_and_matches_hook(teacher, students):
    module = ILDModule({"mla": copy.deepcopy(students["mla"])}, teacher, last_layer_target="unnormed",
                       mixer_loss=False)
    assert not module.students["mla"].model.norm.weight.requires_grad
    batch = packed_batch()
    loss = module.ild_losses(batch)["mla"]
    assert torch.isfinite(loss) and loss.requires_grad
    with pytest.raises(ValueError, match="last_layer_target"):
        ILDModule({"mla": students["mla"]}, teacher, last_layer_target="bogus")


def test_ilkd_loss_is_zero_for_the_teacher_itself(teacher):
    """Sanity of the targets: a 'student' whose layers are the teacher's gives loss 0 (layer and mixer terms)."""
    out = teacher_forward(teacher, *[packed_batch()[k] for k in ("input_ids", "position_ids")],
                                 packed_batch()["attention_mask"], hidden_states=True, mixer_outputs=True,
                                 last_unnormed=True)
    hs = out.hidden_states
    assert len(hs) == teacher.config.num_hidden_layers + 1 and len(out.mixer_outputs) == len(hs) - 1
    torch.testing.assert_close(teacher.model.norm(out.last_unnormed), hs[-1])


def test_kd_loss_falls(teacher, students):
    hybrid = assemble_hybrid(copy.deepcopy(students["mla"]), copy.deepcopy(students["mamba"]), [0, 2]).train()
    module = KDModule(hybrid, teacher, ce_weight=0.1)
    batch = packed_batch(1)
    losses = overfit(lambda: module.kd_loss(batch)[0], list(hybrid.parameters()), lr=1e-2)
    assert losses[-1] < 0.6 * losses[0], losses


def test_dpo_loss_falls(students):
    policy = copy.deepcopy(students["mla"]).train()
    reference = copy.deepcopy(policy)
    module = DPOModule(policy, reference, beta=0.1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 49152, (2, 16), generator=g)
    attn = torch.ones(2, 16, dtype=torch.long)
    attn[1, 12:] = 0
    lm = torch.zeros(2, 16, dtype=torch.bool)
    lm[:, 6:] = True
    lm[1, 12:] = False
    batch = {"chosen_input_ids": ids, "chosen_attention_mask": attn, "chosen_loss_mask": lm,
             "rejected_input_ids": ids.roll(1, -1), "rejected_attention_mask": attn, "rejected_loss_mask": lm}
    first, _ = module.dpo_loss(batch)
    assert abs(first.item() - torch.log(torch.tensor(2.0)).item()) < 1e-5  # policy == reference at the start
    losses = overfit(lambda: module.dpo_loss(batch)[0], list(policy.parameters()), steps=8, lr=1e-3)
    assert losses[-1] < 0.5 * losses[0], losses
    # the reference did not move
    for p, q in zip(reference.parameters(), students["mla"].parameters()):
        assert torch.equal(p, q)


def test_teacher_sees_documents_alone(teacher):
    """Packed rows through teacher_forward equal each document run on its own (no context leaks)."""
    batch = packed_batch(3)
    out = teacher_forward(teacher, batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    ids = batch["input_ids"]
    for row, spans in ((0, [(0, 10), (10, 24)]), (1, [(0, 20)])):
        for a, b in spans:
            alone = teacher.model(input_ids=ids[row:row + 1, a:b], use_cache=False).last_hidden_state
            torch.testing.assert_close(out.last_hidden_state[row:row + 1, a:b], alone, rtol=1e-5, atol=1e-5)


def test_warmup_cosine_and_param_groups():
    p = torch.nn.Parameter(torch.zeros(3, 3))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = warmup_cosine(opt, total_steps=10, warmup_steps=2)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    named = [("model.layers.0.mixer.A_log", torch.nn.Parameter(torch.zeros(4))),
             ("model.layers.0.mixer.in_proj.weight", torch.nn.Parameter(torch.zeros(4, 4))),
             ("model.norm.weight", torch.nn.Parameter(torch.zeros(4))),
             ("x.weight", torch.nn.Parameter(torch.zeros(4, 4)))]
    named[3][1]._no_weight_decay = True
    groups = param_groups(named, 0.1)
    assert [len(g["params"]) for g in groups] == [1, 3] and groups[0]["params"][0] is named[1][1]
    assert len(param_groups(named, 0.0)) == 1
