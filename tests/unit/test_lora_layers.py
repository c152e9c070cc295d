"""LoRA on every layer type peft adapts, not only torch.nn.Linear: transformers' Conv1D (the GPT-2 family's
attention and MLP projections), Embedding; `auto` targets peft's default for the architecture."""

from __future__ import annotations

import pytest
import torch
from test_models import _randomise_lora

from gdrt_core.errors import GdrtError
from gdrt_core.models import apply_lora, load_model, lora_module_names, merge_lora, save_model


def _gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()


IDS = torch.tensor([[1, 5, 9, 3, 7]])


def test_gpt2_conv1d_projections_are_targets():
    names = lora_module_names(_gpt2())
    assert {"c_attn", "c_proj", "c_fc"} <= set(names)  # transformers.pytorch_utils.Conv1D
    assert {"wte", "wpe", "lm_head"} <= set(names)


@pytest.mark.parametrize(
    "targets", [["c_attn"], ["c_attn", "c_proj"], ["c_fc"], ["c_fc", "wpe"], ["auto"]],
    ids=["c_attn", "attention", "mlp", "conv1d+embedding", "auto"],
)
def test_lora_on_gpt2_trains_adapters_and_merges_exactly(targets):
    """Fresh adapters leave the output unchanged (B = 0); one step moves only adapter weights; merging the
    adapters into the Conv1D weights gives the adapted model's logits."""
    base = _gpt2()
    with torch.no_grad():
        reference = base(IDS).logits.clone()
    model = apply_lora(base, r=4, target_modules=targets)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if targets == ["auto"]:
        assert any(".c_attn.lora_A" in n for n in trainable)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, reference)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    model.eval()
    _randomise_lora(model)
    with torch.no_grad():
        adapted = model(IDS).logits.clone()
        torch.testing.assert_close(merge_lora(model)(IDS).logits, adapted, rtol=1e-4, atol=1e-5)


def test_gpt2_adapter_saves_and_loads(tmp_path):
    base_dir = tmp_path / "base"
    _gpt2().save_pretrained(base_dir, safe_serialization=True)
    model = apply_lora(load_model(base_dir, device="cpu"), target_modules=["c_attn", "c_fc"]).eval()
    _randomise_lora(model, seed=3)
    with torch.no_grad():
        expected = model(IDS).logits.clone()
    save_model(model, None, tmp_path / "adapter", base_ref=str(base_dir))
    loaded = load_model(tmp_path / "adapter", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, expected)


def test_unknown_target_names_the_adaptable_layers_and_peft_default():
    with pytest.raises(GdrtError, match=r"q_proj, v_proj do not exist in GPT2LMHeadModel") as err:
        apply_lora(_gpt2())  # the Llama-style default targets
    assert "c_attn" in str(err.value) and "c_fc" in str(err.value)
    assert "peft's default for this architecture: c_attn" in str(err.value)


def test_auto_targets_of_llama(make_tiny_llama):
    model = apply_lora(make_tiny_llama(32), target_modules=["auto"])
    trainable = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"q_proj", "v_proj"}
