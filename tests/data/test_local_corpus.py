"""Local corpora: every file format and field option reads back as the documents written, and each bad input
fails before tokenising with a message naming the file (and line), leaving no cache entry behind."""

import json

import datasets
import pytest

from zebra.data import TokenMixtureDataModule
from zebra.data.formatting import format_conversations, format_texts

TEXTS = [f"Document {i} says w{i} and more w{i}." for i in range(6)]


def _dm(tok, tmp_path, source, **kw):
    kw = {"heldout_fraction": 0.0, "seq_len": 16, "batch_size": 1, **kw}
    return TokenMixtureDataModule(sources=[source], tokenizer=tok, cache_dir=tmp_path / "cache", **kw)


def _documents(dm) -> list[list[int]]:
    dm.setup()
    (store,) = dm._stores
    return [store.column("input_ids", j).tolist() for j in range(len(store))]


def _text_ids(tok, texts):
    return [f.input_ids for f in format_texts(tok, texts)]


def _chat_ids(tok, convs):
    return [f.input_ids for f in format_conversations(tok, convs, "tokenizer")]


def _convs(chat, n=5):
    return [chat(i)["messages"] for i in range(n)]


def test_jsonl_json_and_parquet_chat_round_trip(tok, tmp_path, chat, write_jsonl):
    rows = [chat(i) for i in range(5)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    array = tmp_path / "c.json"
    array.write_text(json.dumps(rows, indent=1))
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    want = _chat_ids(tok, _convs(chat))
    for path in (jsonl, array, parquet):
        assert _documents(_dm(tok, tmp_path, {"path": str(path)})) == want, path


def test_field_options_round_trip(tok, tmp_path, chat, write_jsonl):
    convs = _convs(chat)
    sharegpt = [{"conv": [{"from": "human" if m["role"] == "user" else "gpt", "value": m["content"]} for m in c]}
                for c in convs]
    src = write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt)
    assert _documents(_dm(tok, tmp_path, {"path": str(src), "messages_field": "conv"})) == _chat_ids(tok, convs)

    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"q": c[0]["content"], "a": c[1]["content"], "sys": "Be brief."}
                                                   for c in convs])
    want = _chat_ids(tok, [[{"role": "system", "content": "Be brief."}] + c for c in convs])
    spec = {"path": str(pairs), "prompt_field": "q", "response_field": "a", "system_field": "sys"}
    assert _documents(_dm(tok, tmp_path, spec)) == want

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"body": t, "id": i} for i, t in enumerate(TEXTS)])
    assert _documents(_dm(tok, tmp_path, {"path": str(texts), "text_field": "body"})) == _text_ids(tok, TEXTS)


def test_txt_documents_by_line_paragraph_or_file(tok, tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first line\nsecond line\n\nnext paragraph\n")
    docs = {s: _documents(_dm(tok, tmp_path, {"path": str(txt), "sample_by": s}))
            for s in ("line", "paragraph", "document")}
    assert docs["line"] == _text_ids(tok, ["first line", "second line", "", "next paragraph"])
    assert docs["paragraph"] == _text_ids(tok, ["first line\nsecond line", "next paragraph\n"])
    assert docs["document"] == _text_ids(tok, [txt.read_text()])
    assert _documents(_dm(tok, tmp_path, {"path": str(txt)})) == docs["paragraph"]  # the default


def test_folders_and_globs(tok, tmp_path, write_jsonl):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "b.jsonl", [{"text": t} for t in TEXTS[3:]])
    write_jsonl(folder / "sub" / "a.jsonl", [{"text": t} for t in TEXTS[:3]])
    write_jsonl(folder / ".hidden.jsonl", [{"text": "never read"}])
    (folder / "notes.md").write_text("not data")
    # files in path order: b.jsonl, then sub/a.jsonl
    want = _text_ids(tok, TEXTS[3:] + TEXTS[:3])
    assert _documents(_dm(tok, tmp_path, {"path": str(folder), "text_field": "text"})) == want
    assert _documents(_dm(tok, tmp_path, {"path": str(folder / "**" / "*.jsonl"), "text_field": "text"})) == want
    assert _documents(_dm(tok, tmp_path, {"path": str(folder / "sub" / "*.jsonl"), "text_field": "text"})) == \
        _text_ids(tok, TEXTS[:3])
    with pytest.raises(ValueError, match=r"corpus/\*.jsonl has no field\(s\) \['messages'\]"):
        _dm(tok, tmp_path, str(folder / "*.jsonl")).setup()  # a bare glob string is a local path too (chat)


def test_saved_dataset_split(tok, tmp_path):
    saved = tmp_path / "saved"
    datasets.DatasetDict({"a": datasets.Dataset.from_dict({"text": TEXTS[:2]}),
                          "b": datasets.Dataset.from_dict({"text": TEXTS[2:]})}).save_to_disk(str(saved))
    spec = {"path": str(saved), "split": "b", "text_field": "text"}
    assert _documents(_dm(tok, tmp_path, spec)) == _text_ids(tok, TEXTS[2:])
    with pytest.raises(ValueError, match=r"has no split 'c'; its splits: \['a', 'b'\]"):
        _dm(tok, tmp_path, {**spec, "split": "c"}).setup()


def test_content_keys_the_cache(tok, tmp_path, write_jsonl):
    src = write_jsonl(tmp_path / "t.jsonl", [{"text": t} for t in TEXTS])
    first = _documents(_dm(tok, tmp_path, {"path": str(src), "text_field": "text"}))
    write_jsonl(src, [{"text": t} for t in TEXTS[::-1]])
    assert _documents(_dm(tok, tmp_path, {"path": str(src), "text_field": "text"})) == first[::-1]


# ------------------------------------------------------------------------------------------------ bad input
def _no_cache_written(tmp_path):
    tokenized = tmp_path / "cache" / "tokenized"
    return not tokenized.exists() or not any(tokenized.iterdir())


def test_missing_paths(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no data files match"):
        _dm(tok, tmp_path, {"path": str(tmp_path / "nothing" / "*.jsonl")})
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "empty_folder" / "readme.md").write_text("x")
    with pytest.raises(ValueError, match="empty_folder has no data files"):
        _dm(tok, tmp_path, {"path": str(tmp_path / "empty_folder")})


def test_format_and_option_errors(tok, tmp_path, write_jsonl):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", [{"text": "a"}])
    (mixed / "b.txt").write_text("b")
    with pytest.raises(ValueError, match=r"mixes formats \['json', 'text'\]"):
        _dm(tok, tmp_path, {"path": str(mixed)})
    with pytest.raises(ValueError, match="sample_by applies to .txt files only"):
        _dm(tok, tmp_path, {"path": str(mixed / "a.jsonl"), "sample_by": "line"})
    with pytest.raises(ValueError, match="take no chat fields"):
        _dm(tok, tmp_path, {"path": str(mixed / "b.txt"), "messages_field": "messages"})
    with pytest.raises(ValueError, match="sample_by must be one of"):
        _dm(tok, tmp_path, {"path": str(mixed / "b.txt"), "sample_by": "sentence"})
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="c.csv has an unsupported extension"):
        _dm(tok, tmp_path, {"path": str(tmp_path / "c.csv")})


def test_empty_file_in_a_folder(tok, tmp_path, write_jsonl):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in TEXTS])
    (folder / "b.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=r"b.jsonl is empty"):
        _dm(tok, tmp_path, {"path": str(folder), "text_field": "text"}).setup()
    assert _no_cache_written(tmp_path)


def test_malformed_line_names_file_and_line(tok, tmp_path, write_jsonl):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in TEXTS])
    bad = folder / "b.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "broken\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"b.jsonl:3: malformed JSON"):
        _dm(tok, tmp_path, {"path": str(folder), "text_field": "text"}).setup()
    bad.write_text('{"text": "fine"}\n["a", "list"]\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected a JSON object, got list"):
        _dm(tok, tmp_path, {"path": str(folder), "text_field": "text"}).setup()
    array = tmp_path / "c.json"
    array.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n')
    with pytest.raises(ValueError, match=r"c.json:3: malformed JSON"):
        _dm(tok, tmp_path, {"path": str(array), "text_field": "text"}).setup()
    assert _no_cache_written(tmp_path)


def test_field_missing_from_some_records(tok, tmp_path, chat, write_jsonl):
    rows = [chat(i) for i in range(4)]
    rows[2] = {"conversation": rows[2]["messages"]}
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(ValueError, match=r"c.jsonl:3: no field\(s\) \['messages'\]; this record has "
                                         r"\['conversation'\]"):
        _dm(tok, tmp_path, {"path": str(src)}).setup()
    parquet = tmp_path / "t.parquet"
    datasets.Dataset.from_dict({"text": ["a", None, "c"]}).to_parquet(str(parquet))
    with pytest.raises(ValueError, match=r"t.parquet \(row 1\): field 'text' is null"):
        _dm(tok, tmp_path, {"path": str(parquet), "text_field": "text"}).setup()
    assert _no_cache_written(tmp_path)


# ------------------------------------------------------------------------------------------------ data=local
def test_local_config_builds_the_data_module(tok, tmp_path, chat, write_jsonl):
    from hydra.utils import instantiate

    from tests.helpers.configs import compose_cfg
    from zebra.errors import ConfigError
    from zebra.stages.validate import check_resolves

    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", [chat(i) for i in range(8)])
    cfg = compose_cfg(["data=local", f"data.sft.sources=[{{path: '{folder}/*.jsonl'}}]"])
    dm = instantiate(cfg.data.sft, tokenizer=tok, cache_dir=tmp_path / "cache", seq_len=16, batch_size=1,
                     heldout_fraction=0.0)
    assert _documents(dm) == _chat_ids(tok, _convs(chat, 8))
    with pytest.raises(ConfigError, match=r"data.sft.sources.*has no value"):
        check_resolves(compose_cfg(["data=local"]))
