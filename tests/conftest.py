"""Shared fixtures: everything is built locally (no hub, no network)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(Path(os.environ.get("TMPDIR", "/tmp")) / "gdrt-tests-mlflow.db"))

REPO = Path(__file__).resolve().parents[1]
OFFICE = REPO / "data" / "office"


@pytest.fixture(scope="session")
def office_dataset(tmp_path_factory) -> Path:
    """The bundled Office data curated into a Dataset artifact (once per test session)."""
    from gdrt_core.curate import CurateConfig, run

    out = tmp_path_factory.mktemp("office") / "dataset"
    run(CurateConfig(source=str(OFFICE), format="sliding", domain="office", out=str(out)))
    return out


@pytest.fixture(scope="session")
def office_slice(tmp_path_factory, office_dataset) -> Path:
    """A small slice of Office (200 train / 40 valid / 40 test windows, all items) for fast stage tests."""
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.dataset import Dataset, write_dataset

    full = Dataset(office_dataset)
    out = tmp_path_factory.mktemp("office_slice") / "dataset"
    sizes = {"train": 200, "valid": 40, "test": 40}
    with atomic_output_dir(out) as tmp:
        write_dataset(
            tmp, titles=full.titles, domain=full.domain,
            splits={s: full.split(s).slice(0, n).to_pydict() for s, n in sizes.items()},
            recipe={"slice_of": str(office_dataset), "sizes": sizes},
        )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, office_dataset) -> Path:
    """`gdrt init-model --size tiny` on the Office dataset (seed 0): tokenizer + 2-layer Llama, built once."""
    from gdrt_core.embedded import EmbeddedConfig, run

    out = tmp_path_factory.mktemp("tiny_model") / "model"
    run(EmbeddedConfig(dataset=str(office_dataset), out=str(out), size="tiny", seed=0))
    return out


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1 (free port), stopped at the end of the session."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture()
def office_source_slice(tmp_path) -> Path:
    """A small `sliding`-format source directory cut from data/office (for whole-pipeline tests)."""
    import shutil

    out = tmp_path / "office_src"
    out.mkdir()
    shutil.copy(OFFICE / "id2name4Rec.json", out / "id2name4Rec.json")
    for name, n in (("train", 120), ("valid", 16), ("test", 16)):
        lines = (OFFICE / f"{name}.csv").read_text(encoding="utf-8").splitlines()
        (out / f"{name}.csv").write_text("\n".join(lines[: n + 1]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def make_tiny_llama():
    """Build a small random LlamaForCausalLM in eval mode: make_tiny_llama(vocab_size, **config overrides)."""

    def make(vocab_size: int, seed: int = 0, **overrides):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, **overrides,
        }
        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **config)).eval()

    return make
