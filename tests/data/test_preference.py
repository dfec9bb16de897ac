import torch

from zebra.data import PreferenceDataModule
from zebra.data.preference import split_record, truncate_pair


def test_batches_and_reply_masks(tok, cache_dir):
    dm = PreferenceDataModule(tokenizer=tok, batch_size=4, cache_dir=cache_dir)
    batch = next(iter(dm.train_dataloader(0, 1)))
    shapes = {v.shape for v in batch.values()}
    assert len(shapes) == 1 and next(iter(shapes))[0] == 4  # one common [B, T]
    for side in ("chosen", "rejected"):
        ids, attn, loss = (batch[f"{side}_{k}"] for k in ("input_ids", "attention_mask", "loss_mask"))
        for b in range(4):
            n = int(attn[b].sum())
            assert attn[b, :n].all() and not attn[b, n:].any()  # right padding
            assert not loss[b, n:].any()
            reply = tok.decode(ids[b][loss[b]])
            prompt = tok.decode(ids[b][: int(loss[b].int().argmax())])
            assert reply.endswith("<|im_end|>") and "<|im_start|>" not in reply
            assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>user\n" in prompt
            assert loss[b, int(loss[b].int().argmax()) : n].all()  # the reply is contiguous and ends the sequence


def test_record_shapes(tok):
    p = [{"role": "user", "content": "Hi?"}]
    reply = [{"role": "assistant", "content": " Hello. "}]
    other = [{"role": "assistant", "content": "Go away."}]
    assert split_record("Hi?", "Hello.", "Go away.") == (p, [{"role": "assistant", "content": "Hello."}], other)
    # UltraFeedback style: replies repeat the prompt messages
    assert split_record(p, p + reply, p + other)[1] == [{"role": "assistant", "content": "Hello."}]
    # Anthropic HH style: no prompt field, the prompt is the shared prefix
    assert split_record(None, p + reply, p + other)[0] == p


def test_truncation_follows_trl():
    bos = 1
    prompt, chosen, rejected = [bos] + list(range(100, 140)), list(range(10)), list(range(30))
    # fits: untouched
    assert truncate_pair(prompt, chosen, rejected, 100, 50, bos) == (prompt, chosen, rejected)
    # too long: the prompt loses its left part first (bos kept), to max_prompt_length
    p, c, r = truncate_pair(prompt, chosen, rejected, 60, 20, bos)
    assert p == [bos] + list(range(121, 140)) and len(p) == 20
    assert c == chosen and r == rejected and len(p) + len(r) <= 60
    # still too long: both replies are cut from the right
    p, c, r = truncate_pair(prompt, chosen, rejected, 30, 20, bos)
    assert len(p) == 20 and c == chosen[:10] and r == rejected[:10]
    # short prompt, long replies: only the replies are cut
    p, c, r = truncate_pair([bos, 5, 6], list(range(50)), list(range(40)), 32, 16, bos)
    assert p == [bos, 5, 6] and len(c) == 29 and len(r) == 29


def test_module_applies_length_limits(tok, cache_dir, tmp_path, write_jsonl):
    long_prompt = "Please read this carefully. " * 40
    rows = [{"prompt": long_prompt + f"Question {i}?", "chosen": "Yes. " * 60, "rejected": "No."} for i in range(8)]
    src = write_jsonl(tmp_path / "long.jsonl", rows)
    dm = PreferenceDataModule(source={"path": str(src)}, tokenizer=tok, max_length=96, max_prompt_length=48,
                              batch_size=2, cache_dir=cache_dir)  # fmt: skip
    batch = next(iter(dm.train_dataloader(0, 1)))
    assert batch["chosen_input_ids"].shape[1] == 96
    for side in ("chosen", "rejected"):
        first_reply = batch[f"{side}_loss_mask"].int().argmax(dim=1)
        assert (first_reply == 48).all()  # the prompt was cut to max_prompt_length
    assert int(batch["rejected_attention_mask"][0].sum()) < 96  # the short reply is not padded into the limit
    prompt = tok.decode(dm.records()[0]["prompt"])  # left-truncated: the start of the text is gone
    assert "<|im_start|>system" not in prompt and "Question" in prompt and prompt.endswith("<|im_start|>assistant\n")


def test_reference_template_pairs(llama3_tok, cache_dir):
    dm = PreferenceDataModule(tokenizer=llama3_tok, chat_template="reference", batch_size=2, cache_dir=cache_dir)
    batch = next(iter(dm.train_dataloader(0, 1)))
    ids, loss = batch["chosen_input_ids"][0], batch["chosen_loss_mask"][0]
    assert ids[0] == llama3_tok.bos_token_id
    assert llama3_tok.decode(ids[loss]).endswith("<|eot_id|>")
    assert torch.equal(batch["chosen_attention_mask"].sum(1) > 0, torch.ones(2, dtype=torch.bool))


def test_heldout_records_are_disjoint(tok, cache_dir):
    dm = PreferenceDataModule(tokenizer=tok, heldout_fraction=0.25, cache_dir=cache_dir)
    train, held = dm.records("train"), dm.records("heldout")
    assert len(held) == 12 and len(train) == 36 and not set(train.indices) & set(held.indices)


def test_system_field_and_message_list_records(tok, cache_dir, tmp_path, write_jsonl):
    rows = [
        {"system": "Answer in French.", "question": f"Say hello {i}.", "good": "Bonjour.", "bad": "Hello."}
        for i in range(3)
    ] + [
        {"system": "", "question": "Count to two.", "good": "One, two.", "bad": "Three."},
    ]
    src = write_jsonl(tmp_path / "orca.jsonl", rows)
    spec = {"path": str(src), "system_field": "system", "prompt_field": "question", "chosen_field": "good",
            "rejected_field": "bad"}  # fmt: skip
    dm = PreferenceDataModule(source=[spec], tokenizer=tok, batch_size=1, cache_dir=cache_dir)
    prompts = sorted(tok.decode(dm.records()[i]["prompt"]) for i in range(4))
    assert sum("<|im_start|>system\nAnswer in French.<|im_end|>" in p for p in prompts) == 3
    assert sum("trained by Hugging Face" in p for p in prompts) == 1  # empty system: the template's default
