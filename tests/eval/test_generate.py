"""python -m zebra.eval.generate on a tiny exported hybrid: chat template, streaming, sampling options."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from zebra.eval.generate import chat_input_ids, generate_reply, load_chat_model, main, stream_reply

REPO = Path(__file__).resolve().parents[2]


def expected_greedy(model, tokenizer, messages, n):
    from zebra.eval.generate import stop_token_ids

    ids = chat_input_ids(tokenizer, messages)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=stop_token_ids(tokenizer, model), pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_streamed_reply_equals_greedy_generation(tiny_run):
    model, tok = load_chat_model(tiny_run / "2mla" / "dpo" / "model")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ids = chat_input_ids(tok, messages)
    assert "Be brief." in tok.decode(ids[0]) and tok.decode(ids[0]).rstrip().endswith("assistant")  # template
    pieces = list(stream_reply(model, tok, messages, max_new_tokens=24, temperature=0))
    text = "".join(pieces)
    assert text == expected_greedy(model, tok, messages, 24)
    if text.count(" ") >= 2:  # TextIteratorStreamer hands out words as they complete
        assert len([p for p in pieces if p]) >= 2


def test_sampling_is_seeded(tiny_run):
    model, tok = load_chat_model(tiny_run / "2mla" / "dpo" / "model")
    msgs = [{"role": "user", "content": "Hello"}]
    gen = dict(max_new_tokens=12, temperature=1.5, top_p=0.95, top_k=100)
    a = generate_reply(model, tok, msgs, out=io.StringIO(), seed=3, **gen)["text"]
    b = generate_reply(model, tok, msgs, out=io.StringIO(), seed=3, **gen)["text"]
    c = [generate_reply(model, tok, msgs, out=io.StringIO(), seed=s, **gen)["text"] for s in (4, 5, 6)]
    assert a == b and any(x != a for x in c)


def test_cli_prompt_streams_to_stdout(tiny_run):
    res = subprocess.run([sys.executable, "-m", "zebra.eval.generate", str(tiny_run / "2mla" / "kd" / "model"),
                          "--prompt", "What is a zebra?", "--max-new-tokens", "10", "--temperature", "0"],
                         capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    model, tok = load_chat_model(tiny_run / "2mla" / "kd" / "model")
    want = expected_greedy(model, tok, [{"role": "user", "content": "What is a zebra?"}], 10)
    assert res.stdout == want + "\n"


def test_interactive_loop(tiny_run, monkeypatch, capsys):
    lines = iter(["hi", "/reset", "again", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main([str(tiny_run / "2mla" / "kd" / "model"), "--max-new-tokens", "3", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.count("model> ") == 2


def test_not_a_model_dir(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
