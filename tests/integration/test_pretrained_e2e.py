"""Every stage with the real pretrained backbone (SmolLM2-135M-Instruct, de-quantised), on CPU, on a few
Office windows: init-model -> LoRA SFT step -> group (reference = base) -> GDRT step -> evaluate ->
attribute -> recommend. Slow per window (a 135M model), so the slices are tiny; the whole pipeline through
`gdrt run` is the slow-marked test at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

STEP = {  # one optimiser step on the 4 training windows, no evaluation beyond the final valid loss
    "max_steps": 1, "batch_size": 4, "valid_size": 1, "eval_at_start": False, "eval_every": 0, "save_every": 0,
    "ndcg_every_epoch": False, "log_every": 1, "cpu_threads": 2,
}


@pytest.fixture(scope="module")
def backbone(tmp_path_factory, office_dataset):
    """A 4/2/2-window Office slice and the SmolLM2 Model artifact built by `gdrt init-model --pretrained`."""
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import Dataset, write_dataset
    from gdrt_core.embedded import EmbeddedConfig, run

    root = tmp_path_factory.mktemp("pretrained_e2e")
    full = Dataset(office_dataset)
    sizes = {"train": 4, "valid": 2, "test": 2}
    with atomic_output_dir(root / "dataset") as tmp:
        write_dataset(tmp, titles=full.titles, domain=full.domain,
                      splits={s: full.split(s).slice(0, n).to_pydict() for s, n in sizes.items()}, recipe={"sizes": sizes})
    run(EmbeddedConfig(out=str(root / "base"), dataset=str(root / "dataset"), pretrained="smollm2-135m"))
    return root


def _non_lora_state(model) -> dict:
    import torch

    out = {}
    for name, value in model.state_dict().items():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        out[key] = value.detach().to(torch.float32).clone()
    return out


def _lora_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_every_stage_runs_on_the_pretrained_backbone(backbone):
    import torch

    from gdrt_core.artifacts import read_manifest
    from gdrt_core.attribution import AttributeConfig
    from gdrt_core.attribution import run as attribute
    from gdrt_core.dataset import Dataset
    from gdrt_core.evaluate import EvalConfig
    from gdrt_core.evaluate import run as evaluate
    from gdrt_core.grouping import GroupConfig
    from gdrt_core.grouping import run as group
    from gdrt_core.models import load_model
    from gdrt_core.recommend import Recommender
    from gdrt_core.train import TrainConfig
    from gdrt_core.train import run as train

    data, base = str(backbone / "dataset"), str(backbone / "base")
    base_state = _non_lora_state(load_model(base, device="cpu"))

    # SFT, LoRA with the literature's settings (r 8, alpha 16, dropout 0.05 on q_proj / v_proj, lr 1e-4)
    sft = backbone / "sft"
    train(TrainConfig(dataset=data, model=base, out=str(sft), objective="sft", lr=1e-4, **STEP))
    lora = _lora_tensors(sft)
    assert lora and all(("q_proj" in k or "v_proj" in k) and "lora_" in k for k in lora)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in lora.items())  # B starts at zero: one step moved it
    assert not (sft / "model.safetensors").exists()
    trained = load_model(str(sft), device="cpu")
    for name, value in _non_lora_state(trained).items():  # nothing but the adapter changed
        assert torch.equal(value, base_state[name]), name

    # group with the base model as the reference (meaningful with a pretrained model), then one GDRT step
    groups = backbone / "groups"
    group(GroupConfig(dataset=data, reference=base, out=str(groups), num_groups=2))
    info = json.loads((groups / "groups.json").read_text())
    assert info["num_groups"] == 2 and len(info["sizes"]["train"]) == 2 and min(info["sizes"]["train"]) > 0
    gdrt = backbone / "gdrt"
    manifest = train(TrainConfig(dataset=data, model=base, out=str(gdrt), objective="gdrt", groups=str(groups),
                                 lr=1e-4, **STEP))
    assert manifest["objective"] == "gdrt"
    history = json.loads((gdrt / "trainer_state.json").read_text())["log_history"]
    weights = [h for h in history if "group_weight/0" in h][0]
    assert weights["group_weight/0"] + weights["group_weight/1"] == pytest.approx(1.0, abs=1e-5)
    for name, value in _non_lora_state(load_model(str(gdrt), device="cpu")).items():
        assert torch.equal(value, base_state[name]), name
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in _lora_tensors(gdrt).items())

    # evaluate two test windows: ten catalogue titles each
    ev = backbone / "eval"
    evaluate(EvalConfig(dataset=data, model=str(gdrt), out=str(ev), limit=2, plots=False))
    read_manifest(ev, "eval")
    import pyarrow.parquet as pq

    predictions = pq.read_table(ev / "predictions.parquet").to_pydict()
    catalogue = set(Dataset(data).titles.values())
    assert len(predictions["title"]) == 20 and set(predictions["title"]) <= catalogue
    metrics = json.loads((ev / "metrics.json").read_text())
    assert metrics["n_examples"] == 2 and metrics["invalid_rate"] == 0.0

    # attribution of one window: auxiliary vs history shares
    at = backbone / "attribution"
    attribute(AttributeConfig(dataset=data, model=str(gdrt), out=str(at), limit=1, counterfactual=False))
    summary = json.loads((at / "summary.json").read_text())
    assert 0.0 <= summary["aux_share"] <= 1.0, summary

    # recommend from the adapter directory
    rec = Recommender.load(str(gdrt), device="cpu")
    top = rec.recommend([list(next(iter(Dataset(data).examples("test", 1))).history_titles)], k=3)[0]
    assert len(top.titles) == 3 and set(top.titles) <= catalogue, top


@pytest.mark.slow
def test_gdrt_run_smoke_config_on_the_pretrained_backbone(tmp_path, monkeypatch):
    """`gdrt run --config pipelines/configs/smoke-smollm2.yaml` end to end (minutes on 2 CPU cores)."""
    from gdrt_core.config import read_yaml
    from pipelines import local_run

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = read_yaml(repo / "pipelines" / "configs" / "smoke-smollm2.yaml")
    result = local_run.run(params, tmp_path / "run")
    assert [r["model"] for r in result["rows"]] == ["SFT", "GDRT"]
    for row in result["rows"]:
        assert row["invalid_rate"] == 0.0 and 0.0 <= row["ndcg@10"] <= 1.0
