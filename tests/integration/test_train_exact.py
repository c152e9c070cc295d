"""Exactness: one real training step is the gradient of `gdrt_loss` on the whole optimiser batch, and the
same optimiser batch gives the same update however it is split.

- Pinned: one GdrtTrainer step (SGD, lr 1, full fine-tuning, the tiny Llama) moves the parameters by exactly
  -grad `gdrt_loss` of the 8 windows in one forward, for 8 x 1, 2 x accumulation 4 and 2 processes x 2 x 2.
- Split invariance: for each weights policy, 8 x accumulation 1, 2 x accumulation 4, and 2 processes (gloo)
  x 4 must give the same parameters after two SGD steps (lr 1, so the update is the gradient itself; two
  steps so that `lagged` uses step 1's group losses in step 2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_support import NUM_GROUPS, make_groups, make_tiny_model, short_run_params

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, office_slice):
    root = tmp_path_factory.mktemp("train_exact")
    model = make_tiny_model(office_slice, root / "model")
    groups = make_groups(office_slice, model, root / "groups", limit=40)
    return {"model": str(model), "dataset": str(office_slice), "groups": str(groups), "root": root}


def torchrun(nproc: int, args: list[str], timeout: int = 300) -> None:
    """Run test_train_support.py's `update` in `nproc` workers. A ZeRO stage in `args` builds DeepSpeed's CPU
    op first, outside the time limit (minutes on a busy machine); on timeout the whole process group is
    killed, so that no worker is left holding a port or a build lock."""
    import os
    import signal

    from gdrt_core.train.deepspeed import STAGES, build_cpu_comm_op, free_port, worker_env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(HERE.parent / "test_train_support.py"),
           "update", *args]
    env = worker_env()
    env["PYTHONPATH"] = str(HERE.parents[2])
    if set(args) & set(STAGES):
        build_cpu_comm_op(env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{out[-3000:]}{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]


def gdrt_loss_gradient(model_dir: str, dataset_dir: str, groups_dir: str, n_examples: int) -> torch.Tensor:
    """grad `gdrt_loss` (default tau 1, uniform prior) of the first n_examples train windows in one forward,
    flattened in `model.parameters()` order (float64); zeros for parameters without a gradient."""
    from gdrt_core.dataset import Dataset
    from gdrt_core.loss import gdrt_loss
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.train.data import build_features, load_token_groups, pad_batch

    tok = load_tokenizer(model_dir)
    feats = build_features(Dataset(dataset_dir), "train", tok, token_groups=load_token_groups(groups_dir)[0],
                           limit=n_examples)
    model = load_model(model_dir, device="none")
    model.train()
    b = pad_batch(feats, tok.pad_token_id)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits  # [batch, seq, vocab]
    loss, _ = gdrt_loss(logits[:, :-1], b["labels"][:, 1:], b["group_ids"][:, 1:], num_groups=NUM_GROUPS)
    loss.backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().double().flatten()
                      for p in model.parameters()])


def test_one_training_step_is_the_gradient_of_gdrt_loss(tiny, tmp_path):
    """SGD with lr 1 and no clipping or decay: params_after = params_before - grad. The trainer's step (weights
    from the forward for 8 x 1; look-ahead for 2 x 4; look-ahead and all-reduce for 2 processes x 2 x 2) must
    move the parameters by -grad gdrt_loss(whole batch of 8), to float32 tolerance."""
    from gdrt_core.models import load_model

    n = 8
    start = torch.cat([p.detach().double().flatten() for p in load_model(tiny["model"], device="none").parameters()])
    expected = -gdrt_loss_gradient(tiny["model"], tiny["dataset"], tiny["groups"], n)
    assert expected.abs().max() > 1e-4
    common = dict(policy="batch", steps=1, n_examples=n, work_dir=str(tmp_path / "w"))
    one, _ = short_run_params(tiny["model"], tiny["dataset"], tiny["groups"], batch=8, accum=1, **common)
    accumulated, _ = short_run_params(tiny["model"], tiny["dataset"], tiny["groups"], batch=2, accum=4, **common)
    out = tmp_path / "ddp.pt"
    torchrun(2, [tiny["model"], tiny["dataset"], tiny["groups"], "2", "2", "batch", str(out), "none", "gdrt", "1",
                 str(n)])
    two_processes = torch.load(out)["params"]
    for name, after in (("8 x 1", one), ("2 x 4", accumulated), ("2 processes x 2 x 2", two_processes)):
        diff = (after - start - expected).abs().max() / expected.abs().max()
        assert diff < 1e-4, f"{name}: relative difference {diff:.2e} from -grad gdrt_loss"


@pytest.mark.parametrize("policy", ["batch", "lagged"])
def test_split_does_not_change_the_update(tiny, tmp_path, policy):
    """8x1 == 2x4 == 2 processes x 4, to float tolerance, for both weights policies."""
    base, start = None, None
    common = dict(policy=policy, work_dir=str(tmp_path / "w"))
    whole, logs_whole = short_run_params(tiny["model"], tiny["dataset"], tiny["groups"], batch=8, accum=1, **common)
    split, logs_split = short_run_params(tiny["model"], tiny["dataset"], tiny["groups"], batch=2, accum=4, **common)
    out = tmp_path / "ddp.pt"
    torchrun(2, [tiny["model"], tiny["dataset"], tiny["groups"], "4", "1", policy, str(out)])
    ddp = torch.load(out)["params"]

    from gdrt_core.models import load_model

    start = torch.cat([p.detach().double().flatten() for p in load_model(tiny["model"], device="none").parameters()])
    update = whole - start
    assert update.abs().max() > 1e-4  # the steps did move the parameters
    for other in (split, ddp):
        diff = (other - start - update).abs().max() / update.abs().max()
        assert diff < 1e-4, f"relative difference {diff:.2e}"
    # the logged group weights are those of the whole batch, whatever the split
    for a, b in zip(logs_whole, logs_split, strict=True):
        for k in a:
            if k.startswith(("group_weight", "group_loss", "loss_")):
                assert a[k] == pytest.approx(b[k], rel=1e-4), k
    del base


def test_split_matters_without_whole_batch_counts(tiny, tmp_path):
    """Control: per-micro-batch GDRT (what a naive compute_loss does) gives a different update.

    Shows the test above can fail: with 2 x 4 and weights / counts taken per micro-batch, the update differs.
    """
    import torch.nn.functional as F

    from gdrt_core.dataset import Dataset
    from gdrt_core.loss import gdrt_loss
    from gdrt_core.models import load_model, load_tokenizer
    from gdrt_core.train.data import build_features, load_token_groups, pad_batch

    tok = load_tokenizer(tiny["model"])
    feats = build_features(Dataset(tiny["dataset"]), "train", tok, token_groups=load_token_groups(tiny["groups"])[0], limit=8)

    def grads(chunks):
        model = load_model(tiny["model"], device="none")
        model.train()
        for chunk in chunks:
            b = pad_batch(chunk, tok.pad_token_id)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            loss, _ = gdrt_loss(logits[:, :-1], b["labels"][:, 1:], b["group_ids"][:, 1:], num_groups=4)
            (loss / len(chunks)).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads([feats])
    naive = grads([feats[i:i + 2] for i in range(0, 8, 2)])
    assert F.cosine_similarity(whole, naive, dim=0) < 0.99999 or (whole - naive).abs().max() > 1e-4 * whole.abs().max()
