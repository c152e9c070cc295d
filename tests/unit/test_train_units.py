"""Train-stage pieces without a model: weights policy, collator, checkpoint sealing, DeepSpeed configs, config."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from gdrt_core.errors import GdrtError
from gdrt_core.loss import weighted_group_loss
from gdrt_core.train.data import NO_GROUP, StepWeights, pad_batch
from gdrt_core.train.deepspeed import launch_command, needs_launch, zero_config
from gdrt_core.train.resume import MARKER, checkpoint_problem, latest_valid_checkpoint, seal_checkpoint


def test_batch_policy_weights_are_the_closed_form():
    """L = (1, 2), N = (3, 1), uniform pi, tau 1: w = (e^1, e^2) / (e^1 + e^2) = (0.2689, 0.7311).

    Token coefficients c_g = d weighted_group_loss / d S_g = w_g / N_g = (0.2689 / 3, 0.7311 / 1) = (0.08964, 0.7311).
    """
    sw = StepWeights(2, tau=1.0)
    counts = torch.tensor([3.0, 1.0], dtype=torch.float64)
    w = sw.weights(counts, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert w.tolist() == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)], rel=1e-6)
    sums = torch.zeros(2, requires_grad=True)
    weighted_group_loss(sums, w, counts).backward()
    assert sums.grad.tolist() == pytest.approx([0.26894 / 3, 0.73106], rel=1e-4)


def test_absent_group_gets_no_weight_and_prior_renormalises():
    """Group 1 absent (N_1 = 0): w over groups 0 and 2 only; equal losses -> (0.5, 0, 0.5)."""
    sw = StepWeights(3)
    w = sw.weights(torch.tensor([2.0, 0.0, 5.0]), torch.tensor([1.5, 9.0, 1.5]))
    assert w.tolist() == pytest.approx([0.5, 0.0, 0.5])


def test_lagged_policy_uses_the_previous_step():
    """Step 1: nothing seen -> w = pi = (0.5, 0.5). After L = (0, ln 3) with tau 1:
    w = (1, 3) / 4 = (0.25, 0.75) in step 2, whatever step 2's own losses are."""
    sw = StepWeights(2, policy="lagged")
    counts = torch.tensor([1.0, 1.0])
    assert sw.weights(counts, None).tolist() == pytest.approx([0.5, 0.5])
    sw.end_step(torch.tensor([0.0, math.log(3.0)]), counts)
    assert sw.weights(counts, None).tolist() == pytest.approx([0.25, 0.75], rel=1e-6)
    state = sw.state_dict()
    again = StepWeights(2, policy="lagged")
    again.load_state_dict(json.loads(json.dumps(state)))
    assert again.weights(counts, None).tolist() == pytest.approx([0.25, 0.75], rel=1e-6)


def test_lagged_ema_smooths_the_losses():
    """ema 0.5: v = L1 = (0, 2) after step 1; after L2 = (2, 0): v = 0.5 v + 0.5 L2 = (1, 1) -> w = (0.5, 0.5)."""
    sw = StepWeights(2, policy="lagged", ema=0.5)
    counts = torch.tensor([1.0, 1.0])
    sw.end_step(torch.tensor([0.0, 2.0]), counts)
    sw.end_step(torch.tensor([2.0, 0.0]), counts)
    assert sw.weights(counts, None).tolist() == pytest.approx([0.5, 0.5])


def test_sft_coefficients_are_one_over_the_whole_batch_count():
    """SFT: every token weighs 1 / N with N = 3 + 1 = 4 tokens in the whole optimiser batch."""
    sw = StepWeights(1, objective="sft")
    counts = torch.tensor([4.0], dtype=torch.float64)
    sums = torch.zeros(1, requires_grad=True)
    weighted_group_loss(sums, sw.weights(counts, None), counts).backward()
    assert sums.grad.tolist() == [0.25]
    assert not sw.needs_lookahead


def test_unknown_policy_is_an_error():
    with pytest.raises(GdrtError, match="batch or lagged"):
        StepWeights(2, policy="sometimes")


def test_pad_batch_right_pads_with_no_group():
    feats = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "group_ids": [NO_GROUP, 0, 1]},
        {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": [-100, 6], "group_ids": [NO_GROUP, 2]},
    ]
    b = pad_batch(feats, pad_token_id=2)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 6, 2]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert b["labels"].tolist()[1] == [-100, 6, -100]
    assert b["group_ids"].tolist()[1] == [NO_GROUP, 2, NO_GROUP]


def _fake_checkpoint(root, step):
    ckpt = root / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 64)
    (ckpt / "optimizer.pt").write_bytes(b"o" * 64)
    return ckpt


def test_sealed_checkpoint_is_valid_and_damage_is_detected(tmp_path):
    ckpt = _fake_checkpoint(tmp_path, 2)
    assert "did not finish" in checkpoint_problem(ckpt)
    seal_checkpoint(ckpt, step=2, extra_state={"history": {}})
    assert checkpoint_problem(ckpt) is None
    (ckpt / "optimizer.pt").write_bytes(b"o" * 10)
    assert "optimizer.pt does not match" in checkpoint_problem(ckpt)
    (ckpt / "optimizer.pt").unlink()
    assert "optimizer.pt is missing" in checkpoint_problem(ckpt)


def test_latest_valid_checkpoint_skips_and_moves_broken_ones(tmp_path, capsys):
    good = _fake_checkpoint(tmp_path, 2)
    seal_checkpoint(good, step=2)
    _fake_checkpoint(tmp_path, 4)  # half-written: no marker
    bad = _fake_checkpoint(tmp_path, 6)
    seal_checkpoint(bad, step=6)
    (bad / "model.safetensors").write_bytes(b"")  # truncated after sealing
    assert latest_valid_checkpoint(tmp_path) == good
    out = capsys.readouterr().out
    assert "checkpoint-6" in out and "does not match" in out and f"no {MARKER}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "corrupt-checkpoint-4-0", "corrupt-checkpoint-6-0"]


@pytest.mark.parametrize("stage,zero_stage", [("zero2", 2), ("zero3", 3), ("zero3-offload", 3)])
def test_zero_configs_use_trainer_auto_values(stage, zero_stage):
    cfg = zero_config(stage)
    assert cfg["zero_optimization"]["stage"] == zero_stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping", "train_batch_size"):
        assert cfg[key] == "auto"
    assert cfg["bf16"]["enabled"] == "auto"
    if zero_stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ("offload_optimizer" in cfg["zero_optimization"]) == (stage == "zero3-offload")
    json.dumps(cfg)  # serialisable as a file


def test_launch_decision_and_command(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("GDRT_LAUNCHED", raising=False)
    assert not needs_launch(1, None)
    assert needs_launch(2, None) and needs_launch(1, "zero2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not needs_launch(2, "zero3")  # already a worker
    cmd = launch_command(2, ["train", "--out", "x"], port=1234)
    assert cmd[1:4] == ["-m", "gdrt_core.train.torchrun", "--nnodes=1"] and "--nproc_per_node=2" in cmd
    assert cmd[-5:] == ["-m", "gdrt_core.cli", "train", "--out", "x"]


def test_train_config_from_yaml_and_overrides(tmp_path):
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig, validate

    path = tmp_path / "train.yaml"
    path.write_text("objective: gdrt\ntau: 0.5\nweights: lagged\n")
    cfg = load_config(TrainConfig, path, ["ema=0.9", "grad_accum=4"], dataset="d", model="m", out="o", groups="g")
    assert (cfg.objective, cfg.tau, cfg.weights, cfg.ema, cfg.grad_accum) == ("gdrt", 0.5, "lagged", 0.9, 4)
    validate(cfg)
    with pytest.raises(GdrtError, match="tau"):
        validate(load_config(TrainConfig, None, ["tau=0"], dataset="d", model="m", out="o"))
    with pytest.raises(GdrtError, match="groups"):
        validate(load_config(TrainConfig, None, ["objective=gdrt"], dataset="d", model="m", out="o"))


def test_import_of_the_stage_module_stays_light():
    import subprocess
    import sys

    code = "import sys, gdrt_core.train, gdrt_core.train.deepspeed, gdrt_core.train.resume; " \
           "print(any(m in sys.modules for m in ('torch', 'transformers', 'deepspeed', 'mlflow')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_empty_adapter_is_refused(tmp_path):
    """The ZeRO-3 pitfall: a LoRA save whose tensors were not gathered has zero-size tensors."""
    from safetensors.torch import save_file

    from gdrt_core.train.loop import check_adapter_not_empty

    save_file({"a.lora_A.weight": torch.ones(8, 64), "a.lora_B.weight": torch.ones(64, 8)},
              str(tmp_path / "adapter_model.safetensors"))
    check_adapter_not_empty(tmp_path)
    save_file({"a.lora_A.weight": torch.ones(8, 64), "a.lora_B.weight": torch.empty(0)},
              str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(GdrtError, match="adapter is empty"):
        check_adapter_not_empty(tmp_path)
    save_file({}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(GdrtError, match="0 tensors"):
        check_adapter_not_empty(tmp_path)


def test_select_best_needs_matching_eval_and_save_cadence():
    """select_best compares checkpoints by their valid loss: evaluation and saving must happen together."""
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig, validate

    def cfg(*sets):
        return load_config(TrainConfig, None, ["select_best=true", *sets], dataset="d", model="m", out="o")

    validate(cfg("eval_every=0", "save_every=0"))
    validate(cfg("eval_every=50", "save_every=100"))
    with pytest.raises(GdrtError, match="both per epoch"):
        validate(cfg("eval_every=0", "save_every=200"))
    with pytest.raises(GdrtError, match="multiple of eval_every"):
        validate(cfg("eval_every=30", "save_every=100"))


@pytest.mark.parametrize("value, expected", [
    ("true", "valid_loss"), ("false", "none"), ("valid_loss", "valid_loss"), ("valid_ndcg@10", "valid_ndcg@10"),
    ("VALID_NDCG@10", "valid_ndcg@10"), ("none", "none"),
])
def test_select_best_names_a_metric(value, expected):
    """select_best: false | true (= valid_loss) | valid_loss | valid_ndcg@10, normalised by validate()."""
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig, validate

    cfg = load_config(TrainConfig, None, [f"select_best={value}", "eval_every=0", "save_every=0"],
                      dataset="d", model="m", out="o")
    validate(cfg)
    assert cfg.select_best == expected


@pytest.mark.parametrize("sets, message", [
    (["select_best=valid_ndcg"], "select_best 'valid_ndcg' is unknown"),
    (["select_best=valid_ndcg@10", "eval_every=50", "save_every=50"], "evaluated at epoch ends"),
    (["select_best=valid_ndcg@10", "eval_every=0", "save_every=0", "valid_size=0"], "valid_size >= 1"),
    (["select_best=valid_ndcg@10", "eval_every=0", "save_every=0", "deepspeed=zero3"], "ZeRO-3"),
])
def test_select_best_by_ndcg_is_refused_where_it_cannot_work(sets, message):
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig, validate

    with pytest.raises(GdrtError, match=message):
        validate(load_config(TrainConfig, None, sets, dataset="d", model="m", out="o"))


@pytest.mark.parametrize("value, expected", [("false", "false"), ("False", "false"), ("TRUE", "true"), ("auto", "auto")])
def test_bf16_accepts_yaml_booleans(value, expected):
    """`--set train_settings.bf16=false` arrives as a YAML boolean; it means the setting "false"."""
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig, validate

    cfg = load_config(TrainConfig, None, [f"bf16={value}"], dataset="d", model="m", out="o")
    validate(cfg)
    assert cfg.bf16 == expected
    with pytest.raises(GdrtError, match="bf16 'maybe'"):
        validate(load_config(TrainConfig, None, ["bf16=maybe"], dataset="d", model="m", out="o"))


@pytest.mark.parametrize("sets, expected", [
    (["bf16=false", "lora=false"], "float32"),
    (["bf16=true", "lora=false"], "float32"),  # full fine-tuning: float32 master weights, bf16 autocast
    (["bf16=true", "lora=true"], "bfloat16"),  # frozen base; PEFT keeps the adapters in float32
    (["bf16=true", "lora=false", "deepspeed=zero2"], "bfloat16"),  # DeepSpeed's bf16 optimiser: fp32 masters
    (["bf16=false", "lora=true"], "float32"),
])
def test_weights_dtype_keeps_float32_masters_for_full_fine_tuning(sets, expected):
    from gdrt_core.config import load_config
    from gdrt_core.train import TrainConfig
    from gdrt_core.train.loop import weights_dtype

    assert weights_dtype(load_config(TrainConfig, None, sets, dataset="d", model="m", out="o")) == expected


def test_lora_adapters_stay_float32_on_a_bfloat16_base():
    """What weights_dtype relies on for LoRA: the trainable adapter tensors are float32 on a bf16 base."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gdrt_core.models import ModelConfig, prepare_for_training

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = prepare_for_training(model, ModelConfig(dtype="bfloat16", device="none", lora=True, lora_r=2))
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_set_dotted_creates_settings_dicts_and_names_a_bad_parent():
    """One helper sets a.b.c for `--set` in stage configs, `gdrt run` and `gdrt sweep`."""
    from gdrt_core.config import load_config, set_dotted
    from gdrt_core.train import TrainConfig

    data = {"train_settings": {"epochs": 3}}
    set_dotted(data, "train_settings.lr", 0.01)
    set_dotted(data, "group_settings.batch_size", 8)
    assert data == {"train_settings": {"epochs": 3, "lr": 0.01}, "group_settings": {"batch_size": 8}}
    with pytest.raises(GdrtError, match="'tau.x': 'tau' is not a settings dict") as e:
        set_dotted({"tau": 1.0}, "tau.x", 2, where="sweep.yaml")
    assert "sweep.yaml" in str(e.value)
    with pytest.raises(GdrtError, match="'lora' is not a settings dict"):
        load_config(TrainConfig, None, ["lora=true", "lora.r=4"], dataset="d", model="m", out="o")


def _ndcg_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One of 2 gloo ranks calling GdrtTrainer.valid_ndcg_value with a scorer that fails on rank 0."""
    import contextlib
    import types
    from pathlib import Path

    import torch.distributed as dist

    from gdrt_core.train.trainer import GdrtTrainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def failing(model):
        raise RuntimeError("ranking failed")

    stub = types.SimpleNamespace(
        is_world_process_zero=lambda: rank == 0, autocast_smart_context_manager=contextlib.nullcontext,
        accelerator=types.SimpleNamespace(unwrap_model=lambda m: m), model=None, valid_ndcg=failing,
    )
    try:
        GdrtTrainer.valid_ndcg_value(stub)
        outcome = "returned"
    except Exception as e:  # noqa: BLE001 - the outcome is what the test reads
        outcome = f"{type(e).__name__}: {e}"
    Path(out_dir, f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


def test_valid_ndcg_failure_stops_every_rank(tmp_path):
    """The valid NDCG@10 fails on rank 0 (where it is ranked): rank 0 raises the error itself, rank 1 an error
    naming it, instead of waiting for a number or receiving one."""
    import torch.multiprocessing as mp

    mp.spawn(_ndcg_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "RuntimeError: ranking failed"
    assert (tmp_path / "rank1.txt").read_text().startswith(
        "GdrtError: valid NDCG@10 failed on rank 0: RuntimeError: ranking failed")


def test_more_training_processes_than_the_machine_has_are_refused():
    """num_gpus=10**12 launched torchrun with that many workers and ran until the kernel killed it."""
    from gdrt_core.train.deepspeed import check_process_count

    check_process_count(2, gpus=2, cores=16)
    check_process_count(2, gpus=0, cores=2)  # CPU workers over gloo, one per core
    with pytest.raises(GdrtError, match=r"num_gpus=3 asks for more training processes than this machine has: 2 GPU"):
        check_process_count(3, gpus=2, cores=64)
    with pytest.raises(GdrtError, match=r"num_gpus=1000000000000 .* no GPU and 2 CPU core\(s\)"):
        check_process_count(10**12, gpus=0, cores=2)


def test_a_build_lock_left_by_a_killed_build_is_refused_not_waited_on_forever(tmp_path):
    """torch.utils.cpp_extension waits forever on the `lock` a killed build of DeepSpeed's CPU op leaves;
    the launcher waits while a build is young, returns when the lock goes, refuses one older than wait_s."""
    import os

    from gdrt_core.train.deepspeed import check_build_lock

    check_build_lock(None)  # a torch that does not say where it builds: no check
    check_build_lock(str(tmp_path))  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (1000.0, 1000.0))
    with pytest.raises(GdrtError, match=r"started 20 minutes ago and never finished") as err:
        check_build_lock(str(tmp_path), wait_s=900, clock=lambda: 1000.0 + 1200, sleep=lambda s: None)
    assert err.value.path == str(lock) and "delete the file" in err.value.hint

    naps = []

    def sleep(s):  # the other build finishes during the second wait
        naps.append(s)
        if len(naps) == 2:
            lock.unlink()

    said = []
    check_build_lock(str(tmp_path), wait_s=900, clock=lambda: 1000.0 + 60, sleep=sleep, notify=said.append)
    assert len(naps) == 2 and not lock.exists()
    assert len(said) == 1 and "waiting for another build" in said[0] and str(lock) in said[0]


def test_a_stopped_build_kills_its_compilers_and_removes_its_lock(tmp_path, monkeypatch):
    """Ctrl-C / SIGTERM while DeepSpeed's CPU op builds: the build's whole process group (its ninja and
    compilers) is killed and the lock it took is removed, so the next run neither waits nor is refused."""
    import os
    import signal
    import time

    from gdrt_core.train import deepspeed as ds

    build_dir = tmp_path / "build"
    build_dir.mkdir()
    fake = tmp_path / "fake" / "deepspeed" / "comm"
    fake.mkdir(parents=True)
    (fake.parent / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    child_pid = tmp_path / "compiler.pid"
    (fake / "torch.py").write_text(  # a build that takes the lock and starts a long "compiler"
        "import os, subprocess, time\n"
        "def build_shm_op():\n"
        f"    open({str(build_dir / 'lock')!r}, 'w').close()\n"
        "    p = subprocess.Popen(['sleep', '60'])\n"
        f"    open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
        "    time.sleep(60)\n")
    monkeypatch.setattr(ds, "shm_op_build_dir", lambda: str(build_dir))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake")}

    def interrupt(signum, frame):  # Ctrl-C once the fake build has started its compiler
        if child_pid.exists():
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2, 0.2)
        with pytest.raises(KeyboardInterrupt):
            ds.build_cpu_comm_op(env)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    pid = int(child_pid.read_text())
    for _ in range(50):
        if not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the build's compiler is still running")
    assert not (build_dir / "lock").exists()


@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT", "SIGTERM"), ("SIGINT", "SIGINT")])
def test_a_stopped_launcher_exits_with_one_line_and_no_traceback(signals):
    """torchrun (`python -m torch.distributed.run`) printed two chained SignalException tracebacks when
    Ctrl-C (SIGINT to the launcher and to `gdrt train`) was followed by `stop_launcher`'s SIGTERM; the
    launch command's `gdrt_core.train.torchrun` exits with 128 + the signal and one line, its worker stopped.
    (Since then `gdrt train` passes Ctrl-C on as SIGINT.)"""
    import signal
    import subprocess
    import sys
    import time

    from gdrt_core.train.deepspeed import free_port, launch_command, stop_launcher

    worker = ("import signal, sys, time\nsignal.signal(signal.SIGINT, lambda *a: sys.exit(130))\n"
              "print('ready', flush=True)\ntime.sleep(120)\n")  # ends quietly on SIGINT, as gdrt's workers do
    cmd = launch_command(1, [], port=free_port())
    cmd = [*cmd[:cmd.index("-m", 3)], "--no-python", sys.executable, "-c", worker]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    for name in signals[:-1]:
        proc.send_signal(getattr(signal, name))
        time.sleep(0.3)  # the first signal's shutdown is under way when the next one comes
    stop_launcher(proc, grace_s=60, sig=getattr(signal, signals[-1]))  # Ctrl-C: SIGINT from the terminal, then gdrt's
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    numbers = [getattr(signal, name) for name in signals]
    # a signal that comes after torchrun has stopped its workers and restored the default handlers ends it
    # by that signal (no output): what a shell shows for any killed process
    assert proc.returncode in {*(128 + n for n in numbers), -numbers[-1]}, (proc.returncode, err)
    assert proc.returncode < 0 or err.strip().splitlines()[-1].startswith("torchrun: stopped by signal ")
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("stop", ["KeyboardInterrupt", "Terminated"])
def test_stopping_the_launcher_stops_its_workers(tmp_path, stop):
    """Ctrl-C / SIGTERM while `gdrt train` waits on torchrun: the launcher gets the signal the user sent (SIGINT
    for Ctrl-C, so that its line names it; SIGTERM otherwise), which torchrun passes on to its workers, not a
    SIGKILL that would leave the workers training."""
    import signal
    import subprocess
    import sys
    import time

    from gdrt_core.cli import Terminated
    from gdrt_core.train.deepspeed import stop_launcher, stop_signal

    sig = stop_signal(KeyboardInterrupt() if stop == "KeyboardInterrupt" else Terminated("signal 15"))
    assert sig == (signal.SIGINT if stop == "KeyboardInterrupt" else signal.SIGTERM)
    assert stop_signal(RuntimeError("a bug")) == signal.SIGTERM
    flag = tmp_path / "terminated"
    code = ("import signal, sys, time\n"
            f"signal.signal({int(sig)}, lambda *a: (open({str(flag)!r}, 'w').write('x'), sys.exit(0)))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    start = time.monotonic()
    stop_launcher(proc, grace_s=30, sig=sig)
    assert flag.read_text() == "x" and proc.returncode == 0 and time.monotonic() - start < 30
    stop_launcher(proc)  # already stopped: nothing to do


def test_length_grouped_order_is_seeded_by_epoch_and_pads_less_than_random():
    """400 windows of 10-400 tokens, optimiser batch 4: mega-batches of min(400 // 16, 50) = 25 batches, each
    sorted by length. The order is a permutation fixed by (seed, epoch), another each epoch, the longest window
    first; its batches add a tenth of the padding tokens of a random order's."""
    import random

    from gdrt_core.train.trainer import SeededLengthGroupedSampler

    lengths = [random.Random(i).randint(10, 400) for i in range(400)]
    sampler = SeededLengthGroupedSampler(lengths, batch_size=4, seed=7)
    first = list(sampler)
    assert sorted(first) == list(range(400)) and first == list(SeededLengthGroupedSampler(lengths, 4, 7))
    assert lengths[first[0]] == max(lengths)
    sampler.set_epoch(1)
    second = list(sampler)
    assert second != first and sorted(second) == list(range(400))
    sampler.set_epoch(0)
    assert list(sampler) == first  # a resumed run draws the epoch it stopped in again
    shifted = SeededLengthGroupedSampler(lengths, batch_size=4, seed=8)
    assert list(shifted) != second  # seed 8, epoch 0 is not seed 7, epoch 1 (seed + epoch would make them one)

    def padded(order):
        return sum(4 * max(lengths[i] for i in order[k:k + 4]) for k in range(0, 400, 4))

    shuffled = random.Random(0).sample(range(400), 400)
    real = sum(lengths)
    assert padded(first) - real < 0.1 * (padded(shuffled) - real)  # padding tokens: a tenth of a random order's
    for k in range(4, 100, 4):  # within a mega-batch the batches come longest first
        assert max(lengths[i] for i in first[k:k + 4]) <= min(lengths[i] for i in first[k - 4:k])
    assert list(SeededLengthGroupedSampler([], 4, 7)) == [] and len(SeededLengthGroupedSampler([], 4, 7)) == 0


def test_sampling_reaches_the_trainer(tmp_path):
    from gdrt_core.train import TrainConfig
    from gdrt_core.train.loop import training_arguments

    def args(**kw):
        config = TrainConfig(dataset="d", model="m", out=str(tmp_path / "o"), **kw)
        return training_arguments(config, tmp_path / "w", has_valid=False)

    assert args().train_sampling_strategy == "random"
    assert args(sampling="group_by_length", data_seed=3).train_sampling_strategy == "group_by_length"


def test_length_grouped_training_leaves_the_valid_order_alone():
    """transformers groups the evaluation by length too under group_by_length, and the valid loss (a mean of
    batch means) then moved with `sampling` and data_seed; the valid windows stay in their order."""
    from types import SimpleNamespace

    from torch.utils.data import SequentialSampler

    from gdrt_core.train.trainer import GdrtTrainer

    valid = [{"input_ids": [0] * n} for n in (3, 9, 1, 7)]
    trainer = SimpleNamespace(args=SimpleNamespace(train_sampling_strategy="group_by_length", world_size=1))
    sampler = GdrtTrainer._get_eval_sampler(trainer, valid)
    assert isinstance(sampler, SequentialSampler) and list(sampler) == [0, 1, 2, 3]
    trainer.args.world_size = 2  # several processes: no sampler, accelerate shards the windows in order
    assert GdrtTrainer._get_eval_sampler(trainer, valid) is None

