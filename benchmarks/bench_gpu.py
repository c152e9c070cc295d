"""Training throughput and model FLOPs utilisation (MFU) of `gdrt train`'s step on one device, with the device's
matmul rate measured in the same run. Made for a GPU (CUDA); runs on CPU too (a smoke run with a tiny model).

For the pretrained backbone (`--pretrained smollm2-135m`, converted once by `python -m gdrt_core.pretrained
fetch smollm2-135m`) or a model directory (`--model-dir`): LoRA and full fine-tuning, the SFT and GDRT
objectives, through the Trainer `gdrt train` uses (GdrtTrainer, AdamW, TrainConfig's bf16 = auto: bf16 on a
GPU that has it, float32 on CPU). Windows are the Office training windows (stand-in token groups), batched
two ways:

  random           the windows in random order, as `gdrt train` samples them by default (padding to each
                   batch's longest)
  group_by_length  the first batches `gdrt train --set sampling=group_by_length` trains on: its length-grouped
                   order (SeededLengthGroupedSampler) drawn over 200 optimiser batches of windows, so that the
                   mega-batches hold 50 batches as in a full run (less padding)

Per mode: seconds per optimiser step (median after warm-up steps), real (unpadded) and padded tokens per
second, achieved model TFLOP/s, and MFU against the device's matmul rate measured in this run (bf16 8192^3
on a GPU, float32 [1024, 576] x [576, 1536] on CPU) and against --peak-tflops when given (a datasheet).

Model FLOPs per real token, after PaLM (Chowdhery et al. 2022, appendix B): full fine-tuning 6 N + 12 L d T,
LoRA 4 N + 12 L d T (a frozen weight needs no weight gradient: forward 2 N, input gradients 2 N), with N the
parameters that multiply activations (every linear layer and the LM head; the embedding lookup is free), L
layers, d the hidden size and T the window's length; the LoRA matrices themselves are left out (< 1% of N).

    python benchmarks/bench_gpu.py --pretrained smollm2-135m --batch 32 --steps 20 --json gpu_train.json
    python benchmarks/bench_gpu.py --model-dir TINY --batch 4 --steps 2 --warmup 1   # CPU smoke run
    python benchmarks/bench_gpu.py --pretrained smollm2-135m --padding-only             # padding alone, any machine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GDRT_TRACKING", "off")  # a measurement, not a run to keep
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pretrained import matmul_rate as cpu_matmul_rate  # noqa: E402
from bench_train import stand_in_groups, time_mode  # noqa: E402


def device_matmul_tflops(repeats: int = 10) -> tuple[float, str]:
    """(TFLOP/s, what was measured): a bf16 8192^3 product on CUDA (mean of `repeats` after 3 warm-ups), else
    this machine's float32 rate for SmolLM2's MLP shape (bench_pretrained.matmul_rate)."""
    import torch

    if not torch.cuda.is_available():
        return cpu_matmul_rate(torch.float32) / 1e3, "float32 [1024, 576] x [576, 1536] on CPU"
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - start) / 1e12, "bf16 8192^3 on " + torch.cuda.get_device_name()


def matmul_parameters(model) -> int:
    """N: the weights of every nn.Linear (LoRA's own matrices excluded; the tied LM head counted once)."""
    import torch

    seen, total = set(), 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lora_" not in name and id(module.weight) not in seen:
            seen.add(id(module.weight))
            total += module.weight.numel()
    return total


def model_flops(lengths: list[int], n: int, layers: int, hidden: int, *, lora: bool) -> float:
    """Model FLOPs of one pass over windows of these lengths (module docstring)."""
    return sum(t * ((4 if lora else 6) * n + 12 * layers * hidden * t) for t in lengths)


def length_grouped(features: list[dict], batch: int, windows: int, seed: int = 0) -> list[dict]:
    """The first `windows` of `features` in the order `gdrt train --set sampling=group_by_length` draws them
    (`SeededLengthGroupedSampler`, epoch 0): a sequential sampler then feeds the Trainer those batches."""
    from gdrt_core.train.trainer import SeededLengthGroupedSampler

    order = SeededLengthGroupedSampler([len(f["input_ids"]) for f in features], batch, seed)
    return [features[i] for i in list(order)[:windows]]


def padded_tokens(features: list[dict], batch: int) -> int:
    """Tokens computed when `features` are cut into batches of `batch` (the last may be smaller), each padded to
    its longest window."""
    return sum(len(chunk) * max(len(f["input_ids"]) for f in chunk)
               for chunk in (features[i:i + batch] for i in range(0, len(features), batch)))


def padding(features: list[dict], batch: int, seeds: int = 5) -> dict:
    """Tokens computed per real token (each batch padded to its longest window) over all of `features`: in
    random order (the mean over `seeds` permutations) and in `gdrt train --set sampling=group_by_length`'s order."""
    real = sum(len(f["input_ids"]) for f in features)
    shuffled = [padded_tokens(random.Random(s).sample(features, len(features)), batch) for s in range(seeds)]
    grouped = padded_tokens(length_grouped(features, batch, len(features)), batch)
    return {"windows": len(features), "random": sum(shuffled) / seeds / real, "group_by_length": grouped / real}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def names(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated list of some of `allowed`."""
    def parse(text: str) -> list[str]:
        chosen = [t.strip() for t in text.split(",") if t.strip()]
        wrong = [t for t in chosen if t not in allowed]
        if not chosen or wrong:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(allowed)} (comma-separated), got {text!r}")
        return chosen
    return parse


def main(argv: list[str] | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as work:
        return measure(argv, Path(work))


def measure(argv: list[str] | None, work: Path) -> dict:
    import torch

    from gdrt_core.curate import CurateConfig
    from gdrt_core.curate import run as curate
    from gdrt_core.dataset import Dataset
    from gdrt_core.errors import GdrtError
    from gdrt_core.models import ModelConfig, load_model, load_tokenizer, prepare_for_training
    from gdrt_core.train.data import build_features

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", help="a pretrained backbone of gdrt_core.pretrained (smollm2-135m)")
    src.add_argument("--model-dir", help="a model directory (e.g. gdrt init-model --size tiny)")
    p.add_argument("--tunings", type=names(("lora", "full")), default="lora,full")
    p.add_argument("--objectives", type=names(("sft", "gdrt")), default="sft,gdrt")
    p.add_argument("--samplings", type=names(("random", "group_by_length")), default="random,group_by_length",
                   help="padded tokens/s are counted for group_by_length only (random batches are the Trainer's draw)")
    p.add_argument("--batch", type=positive, default=32, help="windows per optimiser step (one micro-batch)")
    p.add_argument("--steps", type=positive, default=20, help="timed optimiser steps per mode")
    p.add_argument("--warmup", type=positive, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's datasheet peak (dense bf16)")
    p.add_argument("--dataset", help="a curated Office Dataset dir (default: curate data/office)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--padding-only", action="store_true",
                   help="only the tokens computed per real token over every training window (no model run)")
    a = p.parse_args(argv)
    if a.json:
        from gdrt_core.artifacts import check_output_file

        check_output_file(a.json, "a .json file path", {})  # before the measuring, not after it

    if a.pretrained:
        from gdrt_core.pretrained import converted_dir, get_pretrained

        model_dir = str(converted_dir(get_pretrained(a.pretrained))[0])
    else:
        model_dir = a.model_dir
    dataset = a.dataset
    if dataset is None:
        dataset = str(work / "ds")
        curate(CurateConfig(source=str(REPO / "data" / "office"), format="sliding", domain="office", out=dataset))
    tok = load_tokenizer(model_dir)
    windows = a.batch * (a.warmup + a.steps)
    if a.padding_only:
        every = build_features(Dataset(dataset), "train", tok)  # tokenised once for all batch sizes
        ratios = {str(b): padding(every, b) for b in sorted({8, 32, a.batch})}
        for b, r in ratios.items():
            print(f"batch {b}: {r['windows']} windows, tokens computed per real token: random {r['random']:.3f}, "
                  f"group_by_length {r['group_by_length']:.3f} ({r['group_by_length'] / r['random'] - 1:+.1%})")
        if a.json:
            Path(a.json).write_text(json.dumps({"padding": ratios}, indent=2) + "\n", encoding="utf-8")
        return {"padding": ratios}
    # group_by_length draws from 200 batches' worth (mega-batches of 50 batches, as in a full run)
    pool = stand_in_groups(build_features(Dataset(dataset), "train", tok, limit=max(windows, 200 * a.batch)))
    if len(pool) < windows:
        raise GdrtError(f"{dataset} has {len(pool)} training windows; --batch x (--warmup + --steps) needs {windows}",
                        hint="lower --batch, --warmup or --steps, or give a larger --dataset")
    features = pool[:windows]
    rate, rate_what = device_matmul_tflops()
    config = load_model(model_dir, device="none").config
    out: dict = {
        "model": a.pretrained or model_dir, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "batch": a.batch, "steps": a.steps, "warmup": a.warmup,
        "matmul_tflops": rate, "matmul_measured": rate_what, "peak_tflops": a.peak_tflops,
        "tokens_per_window": sum(len(f["input_ids"]) for f in features) / len(features),
        "padding": padding(pool, a.batch), "modes": {},
    }
    orders = {"random": (features, "random"),
              "group_by_length": (length_grouped(pool, a.batch, windows), "sequential")}
    for tuning in a.tunings:
        lora = tuning == "lora"

        def make(lora=lora):
            return prepare_for_training(load_model(model_dir, device="none"), ModelConfig(lora=lora))

        n = matmul_parameters(make())
        for sampling in a.samplings:
            ordered, strategy = orders[sampling]
            # sequential: the timed steps take exactly the windows after the warm-up's; random: the Trainer's own
            # permutation, so the timed steps are counted as the average step
            timed = ordered[a.batch * a.warmup:] if strategy == "sequential" else ordered
            share = 1 / a.steps if strategy == "sequential" else 1 / (a.warmup + a.steps)
            for objective in a.objectives:
                seconds, _ = time_mode(None, "-", 0, ordered, tok, objective=objective, policy="batch", batch=a.batch,
                                       accum=1, steps=a.steps, warmup=a.warmup, work=work / "run", make_model=make,
                                       optim="adamw_torch", sampling=strategy)
                real = sum(len(f["input_ids"]) for f in timed) * share  # per step
                pad = padded_tokens(timed, a.batch) * share if strategy == "sequential" else None
                flops = model_flops([len(f["input_ids"]) for f in timed], n, config.num_hidden_layers,
                                    config.hidden_size, lora=lora) * share
                row = {"seconds_per_step": seconds, "real_tokens_per_s": real / seconds,
                       "padded_tokens_per_s": None if pad is None else pad / seconds,
                       "model_tflops": flops / seconds / 1e12, "matmul_parameters": n}
                row["mfu_vs_matmul"] = row["model_tflops"] / rate
                row["mfu_vs_peak"] = row["model_tflops"] / a.peak_tflops if a.peak_tflops else None
                key = f"{tuning}/{sampling}/{objective}"
                out["modes"][key] = row
                print(f"{key:24s} {seconds:8.4f} s/step {row['real_tokens_per_s']:10.0f} tokens/s "
                      f"{row['model_tflops']:8.3g} TFLOP/s  MFU {row['mfu_vs_matmul']:.1%} of the matmul rate", flush=True)
    print(f"\n{out['device']}, torch {out['torch']}: matmul rate {rate:.3g} TFLOP/s ({rate_what}); "
          f"batch {a.batch} windows, {out['tokens_per_window']:.0f} tokens per window; tokens computed per real token "
          f"over {out['padding']['windows']} windows: random {out['padding']['random']:.3f}, group_by_length "
          f"{out['padding']['group_by_length']:.3f}\n")
    print("| tuning | batches | objective | s/step | tokens/s | model TFLOP/s | MFU (matmul rate) | MFU (peak) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for key, r in out["modes"].items():
        peak = "" if r["mfu_vs_peak"] is None else f"{r['mfu_vs_peak']:.1%}"
        print(f"| {' | '.join(key.split('/'))} | {r['seconds_per_step']:.4f} | {r['real_tokens_per_s']:.0f} | "
              f"{r['model_tflops']:.3g} | {r['mfu_vs_matmul']:.1%} | {peak} |")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return out


if __name__ == "__main__":
    from gdrt_core.cli import report_errors

    sys.exit(report_errors("bench_gpu.py", main))  # a bad model or dataset is one line, not a traceback
