"""Bad input fails early with a message that names the problem."""

import datasets
import huggingface_hub
import pytest

from zebra.data import PreferenceDataModule, TokenMixtureDataModule


def _dm(tok, tmp_path, **kw):
    return TokenMixtureDataModule(tokenizer=tok, cache_dir=tmp_path / "cache", **kw)


def test_missing_file_names_the_path(tok, tmp_path):
    missing = tmp_path / "nowhere" / "chat.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _dm(tok, tmp_path, sources=[{"path": str(missing)}])
    with pytest.raises(FileNotFoundError, match="prefs.jsonl"):
        PreferenceDataModule(source={"path": str(tmp_path / "prefs.jsonl")}, tokenizer=tok)


def test_empty_dataset(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.jsonl.* is empty"):
        _dm(tok, tmp_path, sources=[{"path": str(empty)}]).setup()
    no_rows = tmp_path / "none.parquet"
    datasets.Dataset.from_dict({"messages": []}).to_parquet(str(no_rows))
    with pytest.raises(ValueError, match="none.parquet.*is empty"):
        _dm(tok, tmp_path, sources=[{"path": str(no_rows)}]).setup()


def test_too_short_for_one_batch(tok, tmp_path, chat, write_jsonl):
    src = write_jsonl(tmp_path / "tiny.jsonl", [chat(i) for i in range(10)])
    dm = _dm(tok, tmp_path, sources=[{"path": str(src)}], seq_len=512, batch_size=4, heldout_fraction=0.0)
    with pytest.raises(ValueError, match=r"fewer than one global batch of seq_len x batch_size x world_size = 512 x 4"):
        dm.train_dataloader(0, 1)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dm.setup("fit")


def test_split_without_documents(tok, tmp_path, chat, write_jsonl):
    src = write_jsonl(tmp_path / "two.jsonl", [chat(i) for i in range(2)])  # 20% of 2 rounds to 0
    dm = _dm(tok, tmp_path, sources=[{"path": str(src)}], split="ilkd", heldout_fraction=0.0, seq_len=8, batch_size=1)
    with pytest.raises(ValueError, match="two.jsonl has no tokens in split 'ilkd'"):
        dm.train_dataloader(0, 1)


def test_unknown_fields(tok, tmp_path, chat, write_jsonl):
    src = write_jsonl(tmp_path / "c.jsonl", [chat(i) for i in range(4)])
    with pytest.raises(ValueError, match=r"no field\(s\) \['conversation'\]; its fields are \['messages'\]"):
        _dm(tok, tmp_path, sources=[{"path": str(src), "messages_field": "conversation"}]).setup()
    with pytest.raises(ValueError, match="unknown keys \\['mesages_field'\\]"):
        _dm(tok, tmp_path, sources=[{"path": str(src), "mesages_field": "messages"}])
    with pytest.raises(ValueError, match="both prompt_field and response_field"):
        _dm(tok, tmp_path, sources=[{"path": str(src), "prompt_field": "q"}])
    with pytest.raises(ValueError, match=r"no field\(s\) \['chosen', 'rejected'\]"):
        PreferenceDataModule(source={"path": str(src)}, tokenizer=tok, cache_dir=tmp_path).setup()


def test_unknown_chat_template_and_split(tok, tmp_path):
    with pytest.raises(ValueError, match="unknown chat_template 'chatml'"):
        _dm(tok, tmp_path, chat_template="chatml")
    with pytest.raises(ValueError, match="unknown chat_template"):
        PreferenceDataModule(tokenizer=tok, chat_template="chatml")
    with pytest.raises(ValueError, match="unknown split 'train'"):
        _dm(tok, tmp_path, split="train")
    with pytest.raises(ValueError, match="lacks its special tokens"):  # reference template, non-Llama-3 tokenizer
        _dm(tok, tmp_path, chat_template="reference").setup()


def test_hub_dataset_while_offline(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    dm = _dm(tok, tmp_path, sources=[{"name": "zebra-tests/no-such-dataset"}])
    with pytest.raises(ConnectionError, match="'zebra-tests/no-such-dataset' could not be reached: HF_HUB_OFFLINE"):
        dm.setup()


def test_plain_text_and_prompt_response_sources(tok, tmp_path, write_jsonl):
    text = write_jsonl(tmp_path / "t.jsonl", [{"body": f"Plain document number {i}."} for i in range(30)])
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"q": f"Question {i}?", "a": f"Answer {i}."} for i in range(30)])
    sources = [{"path": str(text), "text_field": "body"}, {"path": str(qa), "prompt_field": "q", "response_field": "a"}]
    dm = _dm(tok, tmp_path, sources=sources, seq_len=32, batch_size=2)
    batch = next(iter(dm.train_dataloader(0, 1)))
    assert batch["input_ids"].shape == (2, 32)
    decoded = tok.decode(dm.rows("heldout")[0]["input_ids"])
    assert "Plain document number" in decoded or "<|im_start|>assistant\nAnswer" in decoded
