"""Resume: SIGKILL a training process mid-run, run the same command again, get the same final weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_support import make_groups, make_tiny_model

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, office_slice):
    root = tmp_path_factory.mktemp("train_resume")
    model = make_tiny_model(office_slice, root / "model")
    groups = make_groups(office_slice, model, root / "groups", limit=48)
    return {"model": str(model), "dataset": str(office_slice), "groups": str(groups)}


SETTINGS = ["max_steps=8", "save_every=2", "keep_checkpoints=3", "eval_every=0", "lora=false", "lr=1e-3",
            "batch_size=4", "grad_accum=2", "max_train=48", "valid_size=4", "eval_at_start=false",
            "ndcg_every_epoch=false", "cpu_threads=1", "weights=lagged", "ema=0.5", "log_every=1"]


def command(tiny, out: Path, *more: str) -> list[str]:
    cmd = [sys.executable, "-m", "gdrt_core.cli", "train", "--dataset", tiny["dataset"], "--model", tiny["model"],
           "--objective", "gdrt", "--groups", tiny["groups"], "--out", str(out)]
    for s in [*SETTINGS, *more]:
        cmd += ["--set", s]
    return cmd


def train_env() -> dict:
    return {**os.environ, "GDRT_TRACKING": "off", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def kill_after_checkpoint_4(cmd: list[str], out: Path) -> None:
    """Run `cmd` (a training into `out`) and SIGKILL it as soon as checkpoint-4 is sealed."""
    from gdrt_core.train.resume import MARKER

    proc = subprocess.Popen(cmd, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marker = out / "checkpoints" / "checkpoint-4" / MARKER
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), proc.communicate()[0].decode()[-3000:] if proc.poll() is not None else "timeout"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def weights(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_sigkill_then_rerun_equals_uninterrupted(tiny, tmp_path):
    """Kill after checkpoint-4 is sealed; damage the newest checkpoint; the re-run skips it and resumes."""
    from gdrt_core.cli import main

    env = train_env()
    killed = tmp_path / "killed"
    kill_after_checkpoint_4(command(tiny, killed), killed)
    assert not (killed / "manifest.json").exists()  # no artifact from a killed run
    ckpt4 = killed / "checkpoints" / "checkpoint-4"
    # a half-written newest checkpoint: the marker is there but a file is truncated
    victim = ckpt4 / "optimizer.pt"
    victim.write_bytes(victim.read_bytes()[:100])

    changed = subprocess.run([*command(tiny, killed), "--set", "lr=5e-4"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert changed.returncode == 2 and "config lr: 0.001 -> 0.0005" in changed.stderr, changed.stderr[-2000:]
    assert "Traceback" not in changed.stderr

    rerun = subprocess.run(command(tiny, killed), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "skipping checkpoint" in rerun.stdout and "checkpoint-4" in rerun.stdout
    assert "resuming from" in rerun.stdout and "checkpoint-2" in rerun.stdout

    os.environ["GDRT_TRACKING"] = "off"
    try:
        straight = tmp_path / "straight"
        args = command(tiny, straight)[3:]
        assert main(args) == 0
    finally:
        os.environ.pop("GDRT_TRACKING", None)
    a, b = weights(killed), weights(straight)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k
    # the means of train_metrics.json cover the whole run, not only the steps since the resume
    resumed, uninterrupted = (json.loads((d / "train_metrics.json").read_text()) for d in (killed, straight))
    for key in ("train_loss", "train_loss_sft", "train_loss_gdrt", "global_step"):
        assert resumed[key] == pytest.approx(uninterrupted[key], rel=1e-5), key


def test_a_length_grouped_run_resumed_inside_its_second_epoch_equals_uninterrupted(tiny, tmp_path):
    """sampling=group_by_length, 24 windows in batches of 8: 3 steps per epoch; killed after checkpoint-4, the
    re-run resumes one step into the second epoch. Its order must be the one the uninterrupted run drew for that
    epoch: transformers' own length-grouped sampler draws it from the global random state, which on a resume
    inside an epoch is restored only after the order was drawn (the re-run trained on other windows)."""
    from gdrt_core.cli import main

    more = ("sampling=group_by_length", "max_train=24", "max_steps=6")
    killed = tmp_path / "killed"
    kill_after_checkpoint_4(command(tiny, killed, *more), killed)
    rerun = subprocess.run(command(tiny, killed, *more), env=train_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout and "checkpoint-4" in rerun.stdout

    os.environ["GDRT_TRACKING"] = "off"
    try:
        straight = tmp_path / "straight"
        assert main(command(tiny, straight, *more)[3:]) == 0
    finally:
        os.environ.pop("GDRT_TRACKING", None)
    a, b = weights(killed), weights(straight)
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-5, k

