"""Teacher loading: the embedded SmolLM2 GGUF (converted once into a cache), local directories, hub ids, and
the errors for everything that cannot be a teacher."""

import json
import time
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from zebra.compose import teacher as T
from zebra.plan.selection import select_layers
from zebra.compose.teacher import (TeacherLoadError, UnsupportedTeacherError, load_teacher, load_teacher_config,
                                   zebra_config_from_teacher)


def tiny_tokenizer(vocab_size=97):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    out.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return out


@pytest.fixture
def llama_dir(tmp_path, tiny_llama):
    model = tiny_llama(g=2, dtype=torch.float32, tied=True)
    model.save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    return tmp_path / "llama", model


# --------------------------------------------------------------------------------------------------------------
# the embedded default (real SmolLM2-135M-Instruct, 4-bit GGUF)
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_converts_once_and_answers(smollm2_teacher, gguf_conversions, zebra_cache):
    # the session's first load of the teacher or of its tokenizer converted the GGUF (tests/conftest.py)
    first = smollm2_teacher
    conversions = [c for c in gguf_conversions if c.gguf == T.embedded_gguf_path()]
    assert len(conversions) == 1, conversions
    teachers = zebra_cache / "teachers"
    assert first.path.startswith(str(teachers))
    second = load_teacher("smollm2_135m")
    assert not second.converted and second.path == first.path
    print(f"\nSmolLM2 teacher: GGUF conversion {conversions[0].seconds:.2f}s, "
          f"load from the cache {second.load_seconds:.2f}s, ratio {conversions[0].seconds / second.load_seconds:.0f}x")
    assert second.load_seconds * 5 <= conversions[0].seconds
    # the cache holds no temporary leftovers, and records its source
    assert [p.name for p in teachers.iterdir() if p.name.startswith(".")] == []
    marker = json.loads((Path(first.path) / T._MARKER).read_text())
    assert marker["converted_from"] == str(T.embedded_gguf_path())

    # identical weights either way
    for (n1, p1), (n2, p2) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1

    cfg = second.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and not hasattr(cfg, "quantization_config")
    tok = second.tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|im_end|>" and tok.bos_token == "<|im_start|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert "<|im_start|>assistant" in tok.decode(inputs["input_ids"][0])
    with torch.no_grad():
        out = second.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"SmolLM2 answer: {answer!r}")
    assert "Paris" in answer


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    """A crash while writing leaves neither the cache directory nor a temporary directory."""
    monkeypatch.setenv("ZEBRA_CACHE", str(tmp_path))

    class Boom(RuntimeError):
        pass

    def fail_save(self, *a, **k):
        raise Boom("disk full")

    gguf = T.embedded_gguf_path()
    monkeypatch.setattr(T, "_check_gguf_architecture", lambda p: {})
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: tiny_tokenizer())
    from transformers import LlamaForCausalLM

    small = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: LlamaForCausalLM(small))
    monkeypatch.setattr(LlamaForCausalLM, "save_pretrained", fail_save)
    with pytest.raises(Boom):
        T.cached_gguf_dir(gguf)
    teachers = tmp_path / "teachers"
    assert not teachers.exists() or list(teachers.iterdir()) == []


def test_conversion_leaves_the_random_state_alone(tmp_path, monkeypatch):
    """The run that converts a GGUF (building models on the way) seeds its students like a run that finds the
    cache: the conversion draws nothing from the caller's RNG."""
    from transformers import LlamaForCausalLM

    small = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    monkeypatch.setattr(T, "_check_gguf_architecture", lambda p: {})
    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", lambda *a, **k: small)
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: tiny_tokenizer())
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", lambda *a, **k: LlamaForCausalLM(small))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    T.convert_gguf(T.embedded_gguf_path(), tmp_path / "converted", digest="0" * 64)
    assert (tmp_path / "converted" / T._MARKER).is_file()
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------------------------------------------
# local directories, configs
# --------------------------------------------------------------------------------------------------------------
def test_local_directory(llama_dir):
    path, model = llama_dir
    teacher = load_teacher(str(path))
    assert not teacher.converted and teacher.tokenizer.chat_template
    ids = torch.randint(3, 97, (1, 9))
    with torch.no_grad():
        assert torch.allclose(teacher.model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("g,tied,rope", [
    (2, True, {"rope_type": "default", "rope_theta": 1e5}),
    (4, False, {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
])
def test_zebra_config_from_teacher(g, tied, rope):
    tc = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=320, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=g, head_dim=32, rms_norm_eps=1e-6,
                     tie_word_embeddings=tied, rope_parameters=rope, bos_token_id=1, eos_token_id=[2, 3],
                     pad_token_id=0, max_position_embeddings=8192)
    zc = zebra_config_from_teacher(tc, ["mla", "mamba", "mamba", "mla"], q_lora_rank=64, kv_lora_rank=32,
                                   qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32, mla_rope="reference")
    for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "max_position_embeddings"):
        assert getattr(zc, f) == getattr(tc, f), f
    assert zc.rope_parameters == tc.rope_parameters
    assert (zc.q_lora_rank, zc.kv_lora_rank, zc.qk_rope_head_dim, zc.mla_rope) == (64, 32, 16, "reference")
    assert zc.mla_layers == [0, 3] and zc.mamba_d_xb == g * 32
    full = zebra_config_from_teacher(tc, ["mla"] * 4)
    assert (full.q_lora_rank, full.kv_lora_rank) == (128, min(2 * g * 32, 128))


def test_ranks_too_large_name_the_field():
    tc = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(ValueError, match="q_lora_rank"):
        zebra_config_from_teacher(tc, ["mla"] * 2, q_lora_rank=65)
    with pytest.raises(ValueError, match="kv_lora_rank"):
        zebra_config_from_teacher(tc, ["mla"] * 2, kv_lora_rank=65)
    with pytest.raises(ValueError, match="qk_nope_head_dim"):
        zebra_config_from_teacher(tc, ["mla"] * 2, qk_rope_head_dim=8, qk_nope_head_dim=4)


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------
def test_missing_paths(tmp_path):
    for bad in (str(tmp_path / "nope"), "./not/here", "~/no_such_teacher_dir", "missing.gguf"):
        with pytest.raises(TeacherLoadError, match="does not exist") as err:
            load_teacher(bad)
        assert bad in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherLoadError, match="no config.json"):
        load_teacher(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(TeacherLoadError, match="not a .gguf"):
        load_teacher(str(tmp_path / "weights.bin"))


def test_hub_id_offline(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # nothing cached
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    with pytest.raises(TeacherLoadError, match="zebra-test/no-such-model.*cannot be reached.*HF_HUB_OFFLINE"):
        load_teacher("zebra-test/no-such-model")
    assert time.perf_counter() - start < 10


def test_non_llama_directory_fails_before_weights(tmp_path):
    path = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50).save_pretrained(path)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")  # would fail differently if read
    with pytest.raises(UnsupportedTeacherError, match="'gpt2'"):
        load_teacher(str(path))
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    cfg.architectures = ["GPT2LMHeadModel"]
    cfg.save_pretrained(path)
    with pytest.raises(UnsupportedTeacherError, match="GPT2LMHeadModel"):
        load_teacher(str(path))
    with pytest.raises(UnsupportedTeacherError, match="gpt2"):
        load_teacher_config(str(path))


def test_llama_with_biases_rejected(tmp_path):
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, attention_bias=True)
    cfg.save_pretrained(tmp_path / "biased")
    with pytest.raises(UnsupportedTeacherError, match="attention_bias"):
        load_teacher(str(tmp_path / "biased"))


def test_non_llama_gguf_fails_from_header(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), arch="gpt2")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedTeacherError, match="'gpt2'"):
        load_teacher(str(path))


def test_too_many_mla_layers():
    with pytest.raises(ValueError, match="cannot choose 31 MLA layers from a 30-layer"):
        select_layers([0.0] * 30, 31)
