"""GPU checks (opt-in: `bash scripts/test.sh -m gpu` on a machine with CUDA): bf16 training of the tiny
model, constrained evaluation on the GPU, and DeepSpeed ZeRO-2 over NCCL when two GPUs are present."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def tiny_gpu_model(tmp_path_factory, office_slice):
    from gdrt_core.embedded import EmbeddedConfig, run

    out = tmp_path_factory.mktemp("gpu") / "base"
    run(EmbeddedConfig(dataset=str(office_slice), out=str(out), size="tiny"))
    return out


def test_bf16_sft_then_evaluate_on_gpu(tmp_path, office_slice, tiny_gpu_model, monkeypatch):
    from gdrt_core.stages import run_stage

    monkeypatch.setenv("GDRT_TRACKING", "off")
    model = tmp_path / "sft"
    run_stage("train", {"max_steps": 10, "batch_size": 8, "lora": False, "bf16": "true", "valid_size": 8,
                        "eval_every": 0, "save_every": 0, "ndcg_every_epoch": False},
              dataset=str(office_slice), model=str(tiny_gpu_model), objective="sft", out=str(model))
    metrics = run_stage("evaluate", {"limit": 8, "device": "cuda", "plots": False},
                        dataset=str(office_slice), model=str(model), out=str(tmp_path / "eval"))
    assert metrics["invalid_rate"] == 0.0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_examples"] == 8


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_zero2_over_nccl(tmp_path, office_slice, tiny_gpu_model, monkeypatch):
    from gdrt_core.stages import run_stage

    monkeypatch.setenv("GDRT_TRACKING", "off")
    run_stage("train", {"max_steps": 4, "batch_size": 4, "lora": True, "valid_size": 8, "eval_every": 0,
                        "save_every": 0, "ndcg_every_epoch": False},
              dataset=str(office_slice), model=str(tiny_gpu_model), objective="sft", out=str(tmp_path / "m"),
              num_gpus=2, deepspeed="zero2")
    assert (tmp_path / "m" / "manifest.json").is_file()
