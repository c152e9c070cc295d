"""bf16 full fine-tuning: float32 master weights vs bfloat16 weights, against float32.

Trains one base model on one Dataset in three modes, each from the same weights and with the same data order,
and prints the valid loss after the same number of optimiser steps:

  fp32            bf16=false                 float32 weights and compute
  bf16            bf16=true                  bf16 autocast, float32 master weights (what `gdrt train` does)
  bf16-weights    bf16=true, weights in bf16 the weights themselves in bfloat16: an AdamW step below half
                                             the bfloat16 spacing of a weight (1/128 at 1.0) rounds away

    .venv/bin/gdrt curate --source data/office --format sliding --domain office --out /tmp/ds
    .venv/bin/gdrt init-model --dataset /tmp/ds --out /tmp/base --size tiny
    .venv/bin/python benchmarks/bench_bf16.py --dataset /tmp/ds --model /tmp/base --steps 300

Full fine-tuning only: with LoRA the base is frozen and the adapters stay float32 either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {"fp32": ("false", None), "bf16": ("true", None), "bf16-weights": ("true", "bfloat16")}


def train_once(dataset: str, model: str, mode: str, steps: int, args, work: Path) -> dict:
    from gdrt_core.train import TrainConfig, loop, run

    bf16, forced_dtype = MODES[mode]
    cfg = TrainConfig(
        dataset=dataset, model=model, out=str(work / mode), objective="sft", lr=args.lr, max_steps=steps,
        batch_size=args.batch_size, lora=False, bf16=bf16, seed=0, max_train=args.max_train,
        valid_size=args.valid_size, eval_every=steps, save_every=steps, eval_at_start=False,
        ndcg_every_epoch=False, log_every=10**6, cpu_threads=args.threads,
    )
    started = time.perf_counter()
    if forced_dtype is None:
        run(cfg)
    else:
        with mock.patch.object(loop, "weights_dtype", lambda _config: forced_dtype):
            run(cfg)
    metrics = json.loads((Path(cfg.out) / "train_metrics.json").read_text())
    return {"valid_loss": metrics["eval_loss"], "train_loss": metrics["train_loss"],
            "seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True)
    p.add_argument("--model", required=True, help="base model directory (gdrt init-model)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-train", type=int, default=None)
    p.add_argument("--valid-size", type=int, default=500)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)

    import os

    os.environ.setdefault("GDRT_TRACKING", "off")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes.split(","):
            results[mode] = train_once(args.dataset, args.model, mode, args.steps, args, Path(tmp))
            r = results[mode]
            print(f"{mode:13s} valid loss {r['valid_loss']:.4f}  train loss {r['train_loss']:.4f}  "
                  f"{r['seconds']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"steps": args.steps, "lr": args.lr, "results": results}, indent=2))
    return results


if __name__ == "__main__":
    main()
