"""benchmarks/bench_gpu.py (the GPU training-throughput script) runs on CPU with the tiny model, so a GPU session
spends its time measuring; its FLOP count and its length-grouped batches are checked against hand values."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from gdrt_core.errors import GdrtError

pytestmark = pytest.mark.integration
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench_gpu():
    """The script as a module; the environment it sets for itself (tracking off) is restored afterwards."""
    environ = dict(os.environ)
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCHMARKS / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCHMARKS))
    os.environ.clear()
    os.environ.update(environ)


def test_model_flops_are_the_palm_count(bench_gpu):
    """Windows of 2 and 3 tokens, N = 10, one layer of width 4: full 2 (60 + 96) + 3 (60 + 144) = 924;
    LoRA (4 N) 2 (40 + 96) + 3 (40 + 144) = 824."""
    assert bench_gpu.model_flops([2, 3], 10, 1, 4, lora=False) == 924
    assert bench_gpu.model_flops([2, 3], 10, 1, 4, lora=True) == 824


def test_length_grouped_batches_are_what_gdrt_train_draws(bench_gpu):
    """The benchmark's group_by_length windows are the first of `gdrt train --set sampling=group_by_length`'s
    order: 40 windows of lengths 1..40, batches of 2, mega-batches of min(40 // 8, 50) = 5 batches sorted by
    length, the longest window first."""
    from gdrt_core.train.trainer import SeededLengthGroupedSampler

    features = [{"input_ids": [0] * n} for n in range(1, 41)]
    first = bench_gpu.length_grouped(features, 2, 10, seed=3)
    drawn = list(SeededLengthGroupedSampler(list(range(1, 41)), 2, 3))[:10]
    assert [len(f["input_ids"]) for f in first] == [n + 1 for n in drawn] and len(first[0]["input_ids"]) == 40
    lengths = [len(f["input_ids"]) for f in first]
    assert lengths[1:] == sorted(lengths[1:], reverse=True)  # one mega-batch: descending after the swapped longest
    assert bench_gpu.padded_tokens(first, 2) == 2 * sum(max(lengths[i:i + 2]) for i in range(0, 10, 2))
    # the last batch may be smaller: windows of 3, 5 and 4 tokens in batches of 2 compute 2 x 5 + 1 x 4
    assert bench_gpu.padded_tokens([{"input_ids": [0] * n} for n in (3, 5, 4)], 2) == 14
    # tokens computed per real token: none padded when all windows have one length; otherwise grouping pads less
    assert bench_gpu.padding([{"input_ids": [0] * 7}] * 12, 3) == {"windows": 12, "random": 1.0, "group_by_length": 1.0}
    ratios = bench_gpu.padding(features, 2)
    assert 1.0 < ratios["group_by_length"] < ratios["random"]


def test_the_benchmark_runs_on_cpu_and_writes_its_json(bench_gpu, tiny_model_dir, office_slice, tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--model-dir", str(tiny_model_dir), "--dataset", str(office_slice), "--batch", "2", "--steps", "1",
                    "--warmup", "1", "--tunings", "lora,full", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {f"{t}/{s}/{o}" for t in ("lora", "full") for s in ("random", "group_by_length")
                                    for o in ("sft", "gdrt")}
    for key, row in result["modes"].items():
        assert row["seconds_per_step"] > 0 and row["model_tflops"] > 0, key
        assert row["mfu_vs_matmul"] == pytest.approx(row["model_tflops"] / result["matmul_tflops"])
        if "group_by_length" in key:
            assert row["padded_tokens_per_s"] >= row["real_tokens_per_s"]
    assert 1.0 <= result["padding"]["group_by_length"] <= result["padding"]["random"]
    full, lora = result["modes"]["full/group_by_length/sft"], result["modes"]["lora/group_by_length/sft"]
    assert full["matmul_parameters"] == lora["matmul_parameters"]  # LoRA's own matrices are not counted


def test_padding_only_measures_every_training_window_without_a_model_run(bench_gpu, tiny_model_dir, office_slice,
                                                                         tmp_path):
    out = tmp_path / "padding.json"
    result = bench_gpu.main(["--model-dir", str(tiny_model_dir), "--dataset", str(office_slice), "--batch", "4",
                             "--padding-only", "--json", str(out)])
    assert json.loads(out.read_text()) == result and set(result) == {"padding"}
    assert set(result["padding"]) == {"4", "8", "32"}
    with pytest.raises(GdrtError, match="is a directory"):  # --json checked before any measuring
        bench_gpu.main(["--model-dir", str(tiny_model_dir), "--dataset", str(office_slice), "--padding-only",
                        "--json", str(tmp_path)])
    with pytest.raises(GdrtError, match="training windows; --batch x"):
        bench_gpu.main(["--model-dir", str(tiny_model_dir), "--dataset", str(office_slice), "--batch", "100000"])
    from gdrt_core.dataset import Dataset

    windows = len(Dataset(office_slice).examples("train"))  # every training window, not the timed sample's
    for ratios in result["padding"].values():  # (the slice is too small for grouping to beat random at batch 32)
        assert ratios["windows"] == windows and ratios["random"] >= 1.0 and ratios["group_by_length"] >= 1.0
