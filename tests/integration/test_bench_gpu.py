"""benchmarks/bench_gpu.py (the GPU training-throughput script) runs on CPU with the tiny model, so a GPU session
spends its time measuring; its FLOP count and its length buckets are checked against hand values."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

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


def test_bucketed_batches_hold_windows_of_neighbouring_lengths(bench_gpu):
    features = [{"input_ids": [0] * n} for n in (5, 1, 4, 2, 6, 3)]
    order = [len(f["input_ids"]) for f in bench_gpu.bucketed(features, 2, seed=1)]
    assert sorted(order[i:i + 2] for i in range(0, 6, 2)) == [[1, 2], [3, 4], [5, 6]]
    assert bench_gpu.padded_tokens(bench_gpu.bucketed(features, 2, seed=1), 2) == 2 * (2 + 4 + 6)


def test_the_benchmark_runs_on_cpu_and_writes_its_json(bench_gpu, tiny_model_dir, office_slice, tmp_path, monkeypatch):
    out = tmp_path / "gpu.json"
    bench_gpu.main(["--model-dir", str(tiny_model_dir), "--dataset", str(office_slice), "--batch", "2", "--steps", "1",
                    "--warmup", "1", "--tunings", "lora,full", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {f"{t}/{s}/{o}" for t in ("lora", "full") for s in ("random", "bucketed")
                                    for o in ("sft", "gdrt")}
    for key, row in result["modes"].items():
        assert row["seconds_per_step"] > 0 and row["model_tflops"] > 0, key
        assert row["mfu_vs_matmul"] == pytest.approx(row["model_tflops"] / result["matmul_tflops"])
        if "bucketed" in key:
            assert row["padded_tokens_per_s"] >= row["real_tokens_per_s"]
    full, lora = result["modes"]["full/bucketed/sft"], result["modes"]["lora/bucketed/sft"]
    assert full["matmul_parameters"] == lora["matmul_parameters"]  # LoRA's own matrices are not counted
