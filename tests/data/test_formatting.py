import pytest

from zebra.data.formatting import (
    _special_ids,
    _tokenize_segments,
    _assistant_spans,
    check_chat_template,
    format_conversation,
    render,
)

CONV = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": " What is 2 + 2? "},
    {"role": "assistant", "content": "It is 4. "},
    {"role": "user", "content": "It is 4."},  # repeats the reply: must not steal its mask
    {"role": "assistant", "content": "Yes:\n```python\nprint(2 + 2)\n```"},
]


def _masked_runs(ids, mask):
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def test_tokenizer_template_matches_apply_chat_template(tok):
    f = format_conversation(tok, CONV)
    assert f.input_ids == tok.apply_chat_template(CONV, tokenize=True)["input_ids"]
    assert len(f.assistant_mask) == len(f.input_ids)


def test_assistant_mask_covers_exactly_assistant_content_and_end_of_turn(tok):
    f = format_conversation(tok, CONV)
    runs = [tok.decode(r) for r in _masked_runs(f.input_ids, f.assistant_mask)]
    # SmolLM2's template keeps content verbatim (trailing space included), then <|im_end|>
    assert runs == ["It is 4. <|im_end|>", "Yes:\n```python\nprint(2 + 2)\n```<|im_end|>"]


def test_reference_template_token_stream(llama3_tok):
    t = llama3_tok
    f = format_conversation(t, CONV, chat_template="reference")
    sid, eid, eot = (t.convert_tokens_to_ids(s) for s in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    expected = [t.bos_token_id]
    for m in CONV:  # bos + <|start_header_id|>role<|end_header_id|>\n\ncontent.strip()<|eot_id|>, no default system
        expected += [sid] + t(m["role"], add_special_tokens=False)["input_ids"] + [eid]
        expected += t("\n\n" + m["content"].strip(), add_special_tokens=False)["input_ids"] + [eot]
    assert f.input_ids == expected
    text = render(t, CONV, "reference")
    head = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou answer briefly.<|eot_id|>"
    assert text.startswith(head + "<|start_header_id|>user")
    runs = [t.decode(r) for r in _masked_runs(f.input_ids, f.assistant_mask)]
    assert runs == ["It is 4.<|eot_id|>", "Yes:\n```python\nprint(2 + 2)\n```<|eot_id|>"]
    gen = format_conversation(t, CONV[:2], "reference", add_generation_prompt=True)
    assert t.decode(gen.input_ids).endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert not any(gen.assistant_mask)


def test_reference_template_needs_llama3_tokens(tok):
    with pytest.raises(ValueError, match=r"lacks its special tokens.*start_header_id"):
        check_chat_template("reference", tok)
    with pytest.raises(ValueError, match="lacks"):
        format_conversation(tok, CONV, chat_template="reference")


def test_unknown_template_name(tok):
    with pytest.raises(ValueError, match="unknown chat_template 'llama2'"):
        format_conversation(tok, CONV, chat_template="llama2")


def test_bad_messages_are_named(tok):
    with pytest.raises(ValueError, match="role"):
        format_conversation(tok, [{"role": "robot", "content": "hi"}])


def test_slow_tokenizer_path_agrees_with_offsets(tok):
    # tokenisers without offsets tokenise the pieces between span edges; on this template both agree
    text = render(tok, CONV)
    seg = _tokenize_segments(tok, text, _assistant_spans(text, CONV), _special_ids(tok))
    fast = format_conversation(tok, CONV)
    assert seg.input_ids == fast.input_ids and seg.assistant_mask == fast.assistant_mask
