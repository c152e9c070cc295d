"""Peak memory of `gdrt evaluate`: whole-process peak RSS and the peak of Python allocations (tracemalloc).

Each measurement runs the stage in a fresh process (so the peaks are its own), from the source tree given
by --src (compare two checkouts: one that keeps every ranking, one that streams):

    .venv/bin/gdrt curate --source data/office --format sliding --domain office --out /tmp/ds
    .venv/bin/gdrt init-model --dataset /tmp/ds --out /tmp/tiny --size tiny
    .venv/bin/python benchmarks/bench_evaluate_memory.py --dataset /tmp/ds --model /tmp/tiny --src . \
        --limit 1925 --chunk-size 64 [--tracemalloc]

Peak RSS includes torch, the model and the trie (~550 MB for the tiny model), which dwarfs what the rankings
take on Office; tracemalloc counts only Python objects (rankings, titles, histories), where what the stage
keeps per example shows. tracemalloc slows Python down by about 2x, so the two are separate runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def child(args: argparse.Namespace) -> None:
    import resource
    import tracemalloc

    from gdrt_core.evaluate import EvalConfig, run

    if args.tracemalloc:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as work:
        metrics = run(EvalConfig(
            dataset=args.dataset, model=args.model, out=str(Path(work) / "eval"), limit=args.limit,
            chunk_size=args.chunk_size, threads=1, plots=False, progress=False,
        ))
    result = {
        "n_examples": metrics["n_examples"], "ndcg@10": metrics["ndcg@10"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: kB
    }
    if args.tracemalloc:
        result["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--src", default=str(Path(__file__).resolve().parents[1]), help="source tree to measure")
    parser.add_argument("--limit", type=int, default=None, help="examples (default: the whole test split)")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    env = {**os.environ, "PYTHONPATH": str(Path(args.src).resolve()), "GDRT_TRACKING": "off"}
    command = [sys.executable, __file__, "--child", "--dataset", args.dataset, "--model", args.model,
               "--chunk-size", str(args.chunk_size)]
    command += ["--limit", str(args.limit)] if args.limit else []
    command += ["--tracemalloc"] if args.tracemalloc else []
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    print(out.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
