"""DeepSpeed ZeRO on CPU (DS_ACCELERATOR=cpu, gloo): same losses and update as without DeepSpeed; ZeRO-3 + LoRA
saves a complete adapter. The first run on a machine compiles DeepSpeed's shm op (~30 s, then cached)."""

from __future__ import annotations

import pytest
import torch
from test_train_exact import torchrun
from test_train_support import make_groups, make_tiny_model, short_run_params

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, office_slice):
    root = tmp_path_factory.mktemp("train_ds")
    model = make_tiny_model(office_slice, root / "model")
    groups = make_groups(office_slice, model, root / "groups", limit=40)
    return {"model": str(model), "dataset": str(office_slice), "groups": str(groups)}


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """Two SGD steps without DeepSpeed, 8 x accumulation 1 (GDRT, batch policy)."""
    return short_run_params(tiny["model"], tiny["dataset"], tiny["groups"], batch=8, accum=1, policy="batch",
                            work_dir=str(tmp_path_factory.mktemp("ref")))


def _compare(reference, result):
    ref_params, ref_logs = reference
    params, logs = result["params"], result["logs"]
    assert (params - ref_params).abs().max() < 1e-4 * max(1.0, ref_params.abs().max().item())
    assert [round(h["loss"], 4) for h in logs] == pytest.approx([round(h["loss"], 4) for h in ref_logs], abs=2e-4)
    assert [h["group_weight/1"] for h in logs] == pytest.approx([h["group_weight/1"] for h in ref_logs], rel=1e-4)


@pytest.mark.parametrize("stage,nproc,batch", [("zero2", 2, 4)])
def test_zero_same_update_as_plain(tiny, reference, tmp_path, stage, nproc, batch):
    out = tmp_path / "ds.pt"
    torchrun(nproc, [tiny["model"], tiny["dataset"], tiny["groups"], str(batch), "1", "batch", str(out), stage])
    _compare(reference, torch.load(out))


@pytest.mark.slow
@pytest.mark.parametrize("stage,nproc,batch,accum", [("zero2", 1, 4, 2), ("zero3", 1, 8, 1), ("zero3", 2, 2, 2)])
def test_zero_same_update_as_plain_more(tiny, reference, tmp_path, stage, nproc, batch, accum):
    out = tmp_path / "ds.pt"
    torchrun(nproc, [tiny["model"], tiny["dataset"], tiny["groups"], str(batch), str(accum), "batch", str(out), stage])
    _compare(reference, torch.load(out))


def test_zero3_lora_adapter_is_complete(tiny, tmp_path, monkeypatch, capfd):
    """`gdrt train --deepspeed zero3 --num-gpus 2` with LoRA: every adapter tensor saved with its full shape.
    The workers print no "trained ..." line: the launching `gdrt train` prints it, once."""
    from safetensors import safe_open

    from gdrt_core.train import TrainConfig, run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "z3lora"
    cfg = TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="gdrt",
                      groups=tiny["groups"], deepspeed="zero3", num_gpus=2, max_steps=2, batch_size=2, max_train=8,
                      valid_size=4, ndcg_every_epoch=False, save_every=0, eval_every=0, lr=1e-2,
                      cpu_threads=1)
    manifest = run(cfg)
    printed = capfd.readouterr().out  # the launcher's and the workers'
    assert "launching 2 process(es)" in printed and "trained gdrt ->" not in printed
    assert manifest["adapter"] is True
    assert "eval_loss_initial" in manifest["metrics"] and "train_loss_gdrt" in manifest["metrics"]
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        lora_b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]
    # 2 layers x (q_proj, v_proj) x (lora_A, lora_B); lora_A: [r=8, hidden=64]
    assert len(shapes) == 8, shapes
    assert all(0 not in s and len(s) == 2 for s in shapes.values())
    assert any(s == [8, 64] for s in shapes.values())
    assert any(t.abs().sum() > 0 for t in lora_b)  # trained, not the zero init


@pytest.mark.slow
def test_zero2_run_with_valid_loss_and_checkpoints(tiny, tmp_path, monkeypatch):
    """ZeRO-2 through `run()`: the valid loss before training (taken on the training engine) and sealed
    checkpoints work as without DeepSpeed."""
    from gdrt_core.train import TrainConfig, run

    monkeypatch.setenv("GDRT_TRACKING", "off")
    out = tmp_path / "z2"
    cfg = TrainConfig(dataset=tiny["dataset"], model=tiny["model"], out=str(out), objective="gdrt",
                      groups=tiny["groups"], deepspeed="zero2", num_gpus=2, max_steps=4, batch_size=2, grad_accum=2,
                      max_train=16, valid_size=4, eval_every=2, save_every=2, ndcg_every_epoch=False, cpu_threads=1)
    metrics = run(cfg)["metrics"]
    assert metrics["global_step"] == 4 and "eval_loss_initial" in metrics and "eval_loss" in metrics
