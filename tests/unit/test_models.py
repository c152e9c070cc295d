"""Model and tokenizer loading, LoRA, merging, adapter directories, and the errors people see."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.models import (
    ModelConfig,
    adapter_base,
    apply_lora,
    count_parameters,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    merge_lora,
    prepare_for_training,
    resolve_dtype,
    save_model,
)

torch = pytest.importorskip("torch")

TITLES = ['Post-it "Super Sticky" Notes', "Pilot G2 Pens &amp; Refills", "Cahier à spirale", "Stapler"]


def _batch(tokenizer):
    """Two prompts of different lengths, right padded: [2, seq]."""
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import tokenize_example

    exs = [tokenize_example(tokenizer, render("office", TITLES[:2], TITLES[2])),
           tokenize_example(tokenizer, render("office", TITLES[1:], TITLES[0]))]
    width = max(len(e) for e in exs)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e)) for e in exs])
    mask = torch.tensor([e.attention_mask + [0] * (width - len(e)) for e in exs])
    return ids, mask


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], attention_mask=batch[1]).logits  # [batch, seq, vocab]


def _randomise_lora(model, seed: int = 1):
    """LoRA starts with B = 0 (an identity adapter); give it weights so merging has something to fold."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


# ------------------------------------------------------------------------------------------------- settings


def test_model_config_defaults_and_overrides():
    from gdrt_core.config import load_config

    cfg = ModelConfig()
    assert (cfg.dtype, cfg.device, cfg.trust_remote_code, cfg.lora) == ("auto", "auto", False, False)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.05)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    cfg = load_config(ModelConfig, overrides=["lora=true", "lora_r=4", "lora_target_modules=q_proj,k_proj"])
    assert cfg.lora is True and cfg.lora_r == 4 and cfg.lora_target_modules == ["q_proj", "k_proj"]


def test_dtype_auto_is_float32_on_cpu():
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("auto", None) is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with pytest.raises(GdrtError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", "cpu")


def test_import_is_light():
    code = "import sys, gdrt_core.models, gdrt_core.embedded; print(sorted(m for m in ('torch','transformers','peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------- loading


def test_load_model_and_tokenizer_from_dir(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, ModelConfig(device="cpu", padding_side="left"))
    assert model.dtype == torch.float32 and not model.training
    assert tokenizer.is_fast and tokenizer.padding_side == "left" and tokenizer.pad_token == "<|pad|>"
    half = load_model(tiny_model_dir, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_pad_token_falls_back_to_eos_then_unk(tiny_model_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    for kept, expected in (({"eos_token": "<|eos|>", "unk_token": "<|unk|>"}, "<|eos|>"), ({"unk_token": "<|unk|>"}, "<|unk|>")):
        out = tmp_path / expected.strip("<|>")
        PreTrainedTokenizerFast(tokenizer_file=str(tiny_model_dir / "tokenizer.json"), **kept).save_pretrained(out)
        tok = load_tokenizer(out)
        assert tok.pad_token == expected


def test_missing_directory_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(GdrtError, match="model directory does not exist") as e:
        load_model(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(GdrtError, match="does not exist"):
        load_tokenizer(missing)


def test_directory_without_safetensors_is_a_clear_error(tiny_model_dir, tmp_path):
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(GdrtError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin") as e:
        load_model(pickled)
    assert str(pickled) in str(e.value) and "save_pretrained" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(GdrtError, match="config.json is missing"):
        load_model(empty)
    with pytest.raises(GdrtError, match="no tokenizer files"):
        load_tokenizer(empty)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GdrtError, match="cannot load model 'gdrt-tests/no-such-model' from the Hugging Face hub") as e:
        load_model("gdrt-tests/no-such-model", device="cpu")
    assert "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(GdrtError, match="cannot load tokenizer 'gdrt-tests/no-such-model'"):
        load_tokenizer("gdrt-tests/no-such-model")


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_only_adapter_parameters(tiny_model_dir):
    """Tiny model: hidden 64, 4 heads of 16, 2 KV heads -> k/v width 32, 2 layers, r = 8.

    q_proj 64 -> 64: A [8, 64] + B [64, 8] = 512 + 512 = 1024
    v_proj 64 -> 32: A [8, 64] + B [32, 8] = 512 + 256 = 768
    per layer 1792, two layers: 3584 trainable parameters, every one named lora_A / lora_B.
    """
    model = apply_lora(load_model(tiny_model_dir, device="cpu"))
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert sum(trainable.values()) == 3584
    assert count_parameters(model)[0] == 3584
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}


def test_lora_unknown_target_lists_the_real_ones(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(GdrtError, match="query_key_value do not exist") as e:
        apply_lora(model, target_modules=["query_key_value"])
    assert "q_proj" in str(e.value) and "down_proj" in str(e.value)


def test_merge_gives_the_same_logits_as_adapter_plus_base(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _batch(tokenizer)
    base_logits = _logits(load_model(tiny_model_dir, device="cpu"), batch)
    model = apply_lora(load_model(tiny_model_dir, device="cpu"), target_modules=["q_proj", "v_proj", "down_proj"])
    _randomise_lora(model)
    model.eval()  # no LoRA dropout
    adapter_logits = _logits(model, batch)
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter does change the output
    merged = merge_lora(model)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(_logits(merged, batch), adapter_logits, atol=1e-5)


def test_saved_adapter_loads_transparently(tiny_model_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_dir)
    batch = _batch(tokenizer)
    model = apply_lora(load_model(tiny_model_dir, device="cpu"))
    _randomise_lora(model, seed=2)
    model.eval()
    expected = _logits(model, batch)
    out = tmp_path / "adapter"
    files = save_model(model, tokenizer, out, base_ref=str(tiny_model_dir))
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert adapter_base(out) == str(tiny_model_dir.resolve())

    loaded = load_model(out, device="cpu")
    assert hasattr(loaded, "peft_config")
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.allclose(_logits(loaded, batch), expected, atol=1e-6)
    merged = load_model(out, device="cpu", merge_adapter=True)
    assert not hasattr(merged, "peft_config")
    assert torch.allclose(_logits(merged, batch), expected, atol=1e-5)
    trainable = load_model(out, device="cpu", trainable_adapter=True)
    assert count_parameters(trainable)[0] == 3584

    # without tokenizer files the adapter dir uses its base model's tokenizer
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).unlink()
    assert load_tokenizer(out).get_vocab() == tokenizer.get_vocab()


def test_wrapping_and_loading_adapters_warn_nothing_about_peft_internals(tiny_model_dir, tmp_path):
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: that FutureWarning
    is about peft's code, and train, attribute and register printed it on every run."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_lora(load_model(tiny_model_dir, device="cpu"))
        save_model(model, None, tmp_path / "adapter", base_ref=str(tiny_model_dir))
        load_model(tmp_path / "adapter", device="cpu", merge_adapter=True)
        load_model(tmp_path / "adapter", device="cpu", trainable_adapter=True)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:  # the filter does not outlive the wrapping
        warnings.simplefilter("always")
        assert model.base_model.model.is_gradient_checkpointing is False
    assert any("is_gradient_checkpointing" in str(w.message) for w in caught)


def test_adapter_without_safetensors_or_base_is_a_clear_error(tiny_model_dir, tmp_path):
    model = apply_lora(load_model(tiny_model_dir, device="cpu"))
    out = tmp_path / "adapter"
    save_model(model, None, out, base_ref=str(tiny_model_dir))
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(GdrtError, match="base model directory .*gone does not exist"):
        load_model(out, device="cpu")
    (out / "adapter_model.safetensors").rename(out / "adapter_model.bin")
    with pytest.raises(GdrtError, match=r"no adapter_model\.safetensors \(found adapter_model\.bin\)"):
        load_model(out, device="cpu")


def test_prepare_for_training_full_or_lora(tiny_model_dir):
    full = prepare_for_training(load_model(tiny_model_dir, device="cpu"), ModelConfig())
    trainable, total = count_parameters(full)
    assert trainable == total and full.training
    lora = prepare_for_training(load_model(tiny_model_dir, device="cpu"), ModelConfig(lora=True, lora_r=4))
    assert count_parameters(lora)[0] == 3584 // 2  # every LoRA matrix has r rows or columns


def test_hub_ids_and_paths_are_told_apart(tmp_path, monkeypatch):
    from gdrt_core.models import _looks_local

    monkeypatch.chdir(tmp_path)
    for hub_id in ("gpt2", "Qwen/Qwen2-0.5B", "meta-llama/Meta-Llama-3-8B"):
        assert not _looks_local(hub_id), hub_id
    (tmp_path / "gpt2").mkdir()  # a directory of that name in the working directory wins
    for path in ("gpt2", "./model", "../model", "/abs/model", "~/model", "runs/x/model"):
        assert _looks_local(path), path
