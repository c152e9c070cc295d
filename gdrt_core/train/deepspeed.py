"""DeepSpeed ZeRO configs and the multi-process launch of `gdrt train`.

`zero_config(stage)` returns a config whose batch sizes, accumulation, clipping, precision and optimiser
come from the TrainingArguments ("auto" values the HF integration fills in), so the same TrainConfig drives
plain, ZeRO-2, ZeRO-3 and ZeRO-3-offload runs. `relaunch_under_torchrun` re-executes the current
`gdrt train` command under `torch.distributed.run` with N processes (one per GPU; on a CPU-only machine,
N processes over gloo with DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from typing import Any

from gdrt_core.errors import GdrtError

STAGES = ("zero2", "zero3", "zero3-offload")
LAUNCHED_ENV = "GDRT_LAUNCHED"  # set in the children so that they do not launch again


def zero_config(stage: str) -> dict[str, Any]:
    """The DeepSpeed config for `stage` with "auto" wherever TrainingArguments knows the value."""
    if stage not in STAGES:
        raise GdrtError(f"deepspeed stage {stage!r} is unknown", hint=f"use one of {', '.join(STAGES)}")
    zero: dict[str, Any] = {
        "stage": 2 if stage == "zero2" else 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": "auto",
    }
    if stage == "zero2":
        zero["allgather_bucket_size"] = 5e8
    else:
        zero.update({
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # one full state dict on save: the adapter / weights are gathered, never saved empty
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if stage == "zero3-offload":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "zero_optimization": zero,
        # the Trainer builds a torch optimiser; DeepSpeed must accept it (also with CPU offload)
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def under_launcher() -> bool:
    """True inside a torchrun / deepspeed worker (the launcher sets LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_launch(num_gpus: int | None, deepspeed: str | None) -> bool:
    """Launch workers when several processes are asked for, or DeepSpeed is (it needs a process group)."""
    if under_launcher() or os.environ.get(LAUNCHED_ENV):
        return False
    return (num_gpus or 1) > 1 or deepspeed is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the workers: CPU-only machines run DeepSpeed on its CPU accelerator over gloo."""
    out = dict(os.environ if env is None else env)
    out[LAUNCHED_ENV] = "1"
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if not has_cuda:
        out.setdefault("DS_ACCELERATOR", "cpu")
        out.setdefault("CUDA_VISIBLE_DEVICES", "")
    out.setdefault("OMP_NUM_THREADS", "1")
    return out


def launch_command(num_procs: int, argv: list[str], *, port: int | None = None) -> list[str]:
    """`python -m torch.distributed.run ... -m gdrt_core.cli <argv>` for one node."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={num_procs}",
        "--master_addr=127.0.0.1", f"--master_port={port or free_port()}",
        "-m", "gdrt_core.cli", *argv,
    ]


def check_process_count(num_procs: int, gpus: int | None = None, cores: int | None = None) -> None:
    """Refuse more worker processes than the machine has GPUs (on a GPU machine) or CPU cores (without
    one: the workers then run on the CPU over gloo, one per process). `gpus` / `cores` default to what torch
    and the OS report. Raises GdrtError naming num_gpus and what the machine has."""
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cores is None:
        from gdrt_core.models import available_cores

        cores = available_cores()
    limit, what = (gpus, f"{gpus} GPU(s)") if gpus else (cores, f"no GPU and {cores} CPU core(s)")
    if num_procs > limit:
        raise GdrtError(f"num_gpus={num_procs} asks for more training processes than this machine has: {what}",
                        path="num_gpus", hint=f"set num_gpus to at most {limit} (one process per GPU)")


def relaunch_under_torchrun(num_procs: int, argv: list[str]) -> None:
    """Run `gdrt <argv>` in `num_procs` workers and wait; a failed worker is an error naming the exit code."""
    if shutil.which(sys.executable) is None:  # pragma: no cover
        raise GdrtError("cannot find the Python interpreter to launch the workers")
    check_process_count(num_procs)
    cmd = launch_command(num_procs, argv)
    print(f"gdrt train: launching {num_procs} process(es): {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env=worker_env(), check=False)
    if proc.returncode != 0:
        raise GdrtError(
            f"the training workers failed (exit code {proc.returncode})",
            hint="see their output above; re-running the same command resumes from the last valid checkpoint",
        )
