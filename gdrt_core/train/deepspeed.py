"""DeepSpeed ZeRO configs and the multi-process launch of `gdrt train`.

`zero_config(stage)` returns a config whose batch sizes, accumulation, clipping, precision and optimiser
come from the TrainingArguments ("auto" values the HF integration fills in), so the same TrainConfig drives
plain, ZeRO-2, ZeRO-3 and ZeRO-3-offload runs. `relaunch_under_torchrun` re-executes the current
`gdrt train` command under `torch.distributed.run` (through `gdrt_core.train.torchrun`) with N processes
(one per GPU; on a CPU-only machine, N processes over gloo with DS_ACCELERATOR=cpu).
"""

from __future__ import annotations

import contextlib
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
    """`python -m gdrt_core.train.torchrun ... -m gdrt_core.cli <argv>` (torchrun, quiet when stopped) for one
    node."""
    return [
        sys.executable, "-m", "gdrt_core.train.torchrun", "--nnodes=1", f"--nproc_per_node={num_procs}",
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


SHM_OP = "deepspeed_shm_comm"  # DeepSpeed's shared-memory all-reduce for its CPU accelerator
STALE_BUILD_S = 900.0  # a build lock older than this was left by a killed build (a build takes 0.5-10 min)


def shm_op_build_dir() -> str | None:
    """The folder where torch.utils.cpp_extension builds DeepSpeed's CPU communication op
    ($TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions, then a folder per Python / torch build), or None
    where this torch does not say."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # pragma: no cover - a torch without the helper: no lock check
        return None
    return _get_build_directory(SHM_OP, verbose=False)


def check_build_lock(build_dir: str | None, wait_s: float = STALE_BUILD_S, *, poll_s: float = 2.0,
                     clock=None, sleep=None, notify=None) -> None:
    """Wait while another process builds the op in `build_dir` (torch's `lock` file there), and refuse a
    lock older than `wait_s` seconds: torch.utils.cpp_extension waits forever on the lock a killed build
    leaves behind (every later DeepSpeed run on the CPU would hang without a word). `notify(message)` is called
    once when the wait begins. Raises GdrtError naming the lock file."""
    import time

    clock, sleep = clock or time.time, sleep or time.sleep
    if not build_dir:
        return
    lock = os.path.join(build_dir, "lock")
    waiting = False
    while True:
        try:
            age = clock() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return
        if age > wait_s:
            raise GdrtError(
                f"DeepSpeed's CPU communication op is locked by a build that started {age / 60:.0f} minutes "
                "ago and never finished",
                path=lock, hint="a killed build leaves this lock behind: if no gdrt training is starting on "
                "this machine, delete the file and run again")
        if not waiting and notify is not None:
            notify(f"waiting for another build of DeepSpeed's CPU communication op to finish (lock {lock}, "
                   f"{age:.0f} s old; refused after {wait_s / 60:.0f} minutes)")
        waiting = True
        sleep(poll_s)


def build_cpu_comm_op(env: dict[str, str]) -> None:
    """Build DeepSpeed's shared-memory all-reduce op once, in one process, before the CPU workers start.

    With DS_ACCELERATOR=cpu every worker's process-group set-up builds the op (ninja, about 30 s on two idle
    cores, several minutes on busy ones) and all but one wait on torch's build lock; built here first, they
    only load it. A build lock left by a killed build is refused (`check_build_lock`). Stopped (Ctrl-C,
    SIGTERM), the build is killed with its compilers and its lock removed, so the next run does not wait on
    it. Progress lines go to stdout. Raises GdrtError when the build fails."""
    import signal

    def say(message: str) -> None:
        print(f"gdrt train: {message}", flush=True)

    build_dir = shm_op_build_dir()
    check_build_lock(build_dir, notify=say)
    if not build_dir or not os.path.exists(os.path.join(build_dir, f"{SHM_OP}.so")):
        say(f"building DeepSpeed's CPU communication op ({SHM_OP}; once per machine, 0.5-5 minutes)")
    code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # its own group: ninja and the compilers with it
    try:
        _, err = proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if build_dir:  # no lock was there when it started: it is the killed build's
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(build_dir, "lock"))
        raise
    if proc.returncode != 0:
        raise GdrtError(f"building DeepSpeed's CPU communication op ({SHM_OP}) failed:\n{err[-2000:]}",
                        hint="it needs a C++ compiler and ninja (pip install ninja)")


def stop_launcher(proc: subprocess.Popen, grace_s: float = 60.0, sig: int | None = None) -> None:
    """Stop a running torchrun: `sig` (default SIGTERM), which it passes on to its workers before it exits;
    SIGKILL after `grace_s` seconds. (A SIGKILL first would leave the workers running.)"""
    import signal

    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM if sig is None else sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_signal(e: BaseException) -> int:
    """The signal that passes the stop `e` of `gdrt train` on to its launcher: SIGINT for Ctrl-C (so that the
    launcher's line names the signal the user sent, which it usually got from the terminal too), SIGTERM for
    anything else (`cli.Terminated`, a KeyboardInterrupt subclass, or an error)."""
    import signal

    return signal.SIGINT if type(e) is KeyboardInterrupt else signal.SIGTERM


def relaunch_under_torchrun(num_procs: int, argv: list[str], *, deepspeed: str | None = None) -> None:
    """Run `gdrt <argv>` in `num_procs` workers and wait; a failed worker is an error naming the exit code.
    With `deepspeed` on a machine without CUDA, DeepSpeed's CPU communication op is built first
    (`build_cpu_comm_op`)."""
    if shutil.which(sys.executable) is None:  # pragma: no cover
        raise GdrtError("cannot find the Python interpreter to launch the workers")
    check_process_count(num_procs)
    env = worker_env()
    if deepspeed and env.get("DS_ACCELERATOR") == "cpu":
        build_cpu_comm_op(env)
    cmd = launch_command(num_procs, argv)
    print(f"gdrt train: launching {num_procs} process(es): {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        proc.wait()
    except BaseException as e:  # Ctrl-C, SIGTERM (`Terminated`): stop the workers too, not only their launcher
        stop_launcher(proc, sig=stop_signal(e))
        raise
    if proc.returncode != 0:
        raise GdrtError(
            f"the training workers failed (exit code {proc.returncode})",
            hint="see their output above; re-running the same command resumes from the last valid checkpoint",
        )
