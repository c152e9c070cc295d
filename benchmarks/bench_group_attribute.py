"""Benchmark the grouping and attribution stages: examples/s on the embedded tiny and small models.

    python benchmarks/bench_group_attribute.py                        # Office, tiny + small, CPU
    python benchmarks/bench_group_attribute.py --sizes small --device cuda --group-examples 4096

Builds the curated Office dataset and the embedded models in a temporary directory (or uses --dataset),
then times, per model size:
- group: r_t for `--group-examples` train windows (history removal `drop` and `mask`), one forward pass each;
- attribute: feature ablation of `--attr-examples` test windows (4 + history-items passes each), without and
  with the counterfactual check (3 x (1 + negatives) more passes each), and gradient x input.
Model loading and artifact writing are outside the timed part; tokenisation is inside it.
Prints a Markdown table (paste it into docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["GDRT_TRACKING"] = "off"


def build_inputs(work: Path, dataset: str | None, sizes: list[str]) -> tuple[Path, dict[str, Path]]:
    from gdrt_core.curate import CurateConfig
    from gdrt_core.curate import run as curate
    from gdrt_core.embedded import EmbeddedConfig
    from gdrt_core.embedded import run as init_model

    ds = Path(dataset) if dataset else work / "office"
    if not dataset:
        curate(
            CurateConfig(source=str(REPO / "data" / "office"), format="sliding", domain="office", out=str(ds))
        )
    models = {}
    for size in sizes:
        models[size] = work / f"model-{size}"
        init_model(EmbeddedConfig(dataset=str(ds), out=str(models[size]), size=size))
    return ds, models


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_size(size: str, ds: Path, model_dir: Path, args, work: Path) -> list[tuple]:
    from gdrt_core import attribution, grouping
    from gdrt_core.attribution import AttributeConfig
    from gdrt_core.grouping import GroupConfig
    from gdrt_core.scoring import load_scoring_model

    model, tokenizer = load_scoring_model(str(model_dir), device=args.device)
    device = str(next(model.parameters()).device)
    rows = []
    for removal in ("drop", "mask"):
        cfg = GroupConfig(
            dataset=str(ds),
            reference=str(model_dir),
            out=str(work / f"groups-{size}-{removal}"),
            splits=["train"],
            limit=args.group_examples,
            batch_size=args.batch_size,
            history_removal=removal,
            progress=False,
        )
        warm = GroupConfig(**{**cfg.__dict__, "limit": 16, "out": cfg.out + "-warm"})
        grouping.run(warm, model=model, tokenizer=tokenizer)  # first-call overheads out of the timing
        seconds = timed(lambda cfg=cfg: grouping.run(cfg, model=model, tokenizer=tokenizer))
        rows.append((size, device, f"group ({removal})", args.group_examples, seconds))
    for name, extra in (
        ("attribute (ablation)", {"counterfactual": False}),
        ("attribute (ablation + counterfactual, 9 negatives)", {"counterfactual": True, "num_negatives": 9}),
        ("attribute (grad x input)", {"counterfactual": False, "method": "grad_x_input"}),
    ):
        cfg = AttributeConfig(
            dataset=str(ds),
            model=str(model_dir),
            out=str(work / f"attr-{size}"),
            limit=args.attr_examples,
            batch_size=args.batch_size,
            progress=False,
            **extra,
        )
        seconds = timed(lambda cfg=cfg: attribution.run(cfg, model=model, tokenizer=tokenizer))
        rows.append((size, device, name, args.attr_examples, seconds))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", help="a curated Dataset dir (default: curate the bundled Office data)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--group-examples", type=int, default=512)
    p.add_argument("--attr-examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-group-attr-") as tmp:
        work = Path(tmp)
        ds, models = build_inputs(work, args.dataset, args.sizes)
        rows = []
        for size in args.sizes:
            rows += bench_size(size, ds, models[size], args, work)
    print(
        f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, batch size {args.batch_size}\n"
    )
    print("| model | device | stage | examples | seconds | examples/s |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for size, device, stage, n, seconds in rows:
        print(f"| {size} | {device} | {stage} | {n} | {seconds:.1f} | {n / seconds:.1f} |")


if __name__ == "__main__":
    main()
