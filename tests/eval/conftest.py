"""Fixtures for the evaluation tests: a tiny random Llama teacher with the SmolLM2 tokenizer, and a fake training
run (ILD'd students, assembled / KD'd / DPO'd hybrids, stage reports and CSV logs) built from it in seconds."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MLA = {"q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16}


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core machine OpenMP spin-waiting makes small matmuls far slower with 2 threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smol_tokenizer():
    from zebra.compose.teacher import load_tokenizer

    return load_tokenizer("smollm2_135m")


def tiny_llama(tokenizer, seed=0, layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=8192,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # sharper than HF's N(0, 0.02) so that models differ measurably
        model.model.embed_tokens.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, smol_tokenizer):
    path = tmp_path_factory.mktemp("teacher") / "tiny_llama"
    model = tiny_llama(smol_tokenizer)
    model.save_pretrained(path)
    smol_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_teacher_dir, smol_tokenizer):
    """<root>/tiny/{ilkd/{mla,mamba}/model, 2mla/kd/{model,report.json,csv}, 2mla/dpo/model, smart/}."""
    from transformers import LlamaForCausalLM

    from zebra.compose.students import assemble_hybrid, build_student
    from zebra.model.export import save_hf_model

    root = tmp_path_factory.mktemp("artifacts")
    model_dir = root / "tiny"
    base = LlamaForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    torch.manual_seed(0)
    mla, _ = build_student(base, TINY_MLA, "mla")
    mamba, _ = build_student(base, TINY_MLA, "mamba")
    save_hf_model(mla, model_dir / "ilkd" / "mla" / "model", smol_tokenizer)
    save_hf_model(mamba, model_dir / "ilkd" / "mamba" / "model", smol_tokenizer)
    hybrid = assemble_hybrid(mla, mamba, [0, 2])
    mix = model_dir / "2mla"
    with torch.no_grad():  # "training": the KD'd and DPO'd hybrids differ from the assembled one
        for p in hybrid.model.layers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    save_hf_model(hybrid, mix / "kd" / "model", smol_tokenizer)
    (mix / "kd" / "report.json").write_text(json.dumps({"stage": "kd", "mla_layers": [0, 2],
                                                        "teacher": str(tiny_teacher_dir)}))
    csv_dir = mix / "kd" / "csv" / "version_0"
    csv_dir.mkdir(parents=True)
    rows = ["step,train/loss,train/kl_per_token,train/global_step"]
    rows += [f"{s},{5 - 0.1 * s},{0.5 - 0.01 * s},{s}" for s in range(20)]
    (csv_dir / "metrics.csv").write_text("\n".join(rows) + "\n")
    (model_dir / "ilkd" / "report.json").write_text(json.dumps({"loss_history": [3.0, 2.0, 1.5, 1.2]}))
    with torch.no_grad():
        hybrid.lm_head.weight.mul_(1.01)
    save_hf_model(hybrid, mix / "dpo" / "model", smol_tokenizer)
    (model_dir / "smart").mkdir()
    (model_dir / "smart" / "sensitivity.json").write_text(json.dumps(
        {"num_layers": 4, "scores": [0.3, 0.1, 0.2, 0.05], "selections": {"2": [0, 2]}}))
    return model_dir
