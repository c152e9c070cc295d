"""Benchmark raw-dump curation: generate an amazon2014-format dump, curate it, report reviews/s and peak RSS.

    python benchmarks/bench_curate.py                      # 20,000,000 reviews
    python benchmarks/bench_curate.py --reviews 2000000    # a quick run

The dump imitates `reviews_<Category>_5.json` (one JSON object per line with reviewerID, asin,
reviewerName, helpful, reviewText, overall, summary, unixReviewTime, reviewTime) and
`meta_<Category>.json` (Python-literal lines; about 3% of items without a title, some titles with HTML
entities). Users have >= 5 reviews in time order, item popularity is long-tailed. Curation runs in a
child process, so its peak RSS and CPU time are the child's alone; the load average is printed because
the wall time depends on what else the machine runs, the CPU time much less.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXTS = [
    "Works as described.",
    "Good value for the price, arrived quickly and does what it should. I would buy it again.",
    "I bought this for my home office and it has held up well after several months of daily use. The build "
    "quality is better than I expected and the instructions were clear.",
    "Not what I hoped for. The size is smaller than the picture suggests and one part was missing, but the "
    "seller replaced it without any fuss. After that it worked fine and I have been using it every day since "
    "then; overall a decent purchase, although there are probably better options at this price point.",
]


def generate_dump(directory: Path, num_reviews: int, seed: int = 0) -> tuple[Path, Path]:
    """Write reviews_Bench_5.json and meta_Bench.json into `directory`; returns their paths."""
    rng = np.random.default_rng(seed)
    lengths = 5 + rng.geometric(1 / 6, size=num_reviews // 5)  # reviews per user, >= 5, mean ~10
    cut = int(np.searchsorted(np.cumsum(lengths), num_reviews))
    lengths = lengths[: cut + 1]
    lengths[-1] -= int(lengths.sum()) - num_reviews
    if lengths[-1] <= 0:
        lengths = lengths[:-1]
    num_users = len(lengths)
    num_items = max(10, num_reviews // 30)
    weights = 1.0 / np.arange(1, num_items + 1) ** 0.8  # long-tailed popularity
    items = rng.choice(num_items, size=int(lengths.sum()), p=weights / weights.sum())
    user_of = np.repeat(np.arange(num_users), lengths)
    starts = rng.integers(1_000_000_000, 1_380_000_000, size=num_users)
    steps = rng.integers(0, 30 * 86400, size=len(items)) // 86400 * 86400
    first_of_user = np.repeat(np.cumsum(lengths) - lengths, lengths)
    cum = np.cumsum(steps)
    times = starts[user_of] + (cum - cum[first_of_user]) // 1
    order = np.argsort(rng.random(len(items)))  # reviews of all users interleaved, like the dumps
    texts = [json.dumps(t) for t in TEXTS]
    reviews = directory / "reviews_Bench_5.json"
    with open(reviews, "w", encoding="utf-8") as f:
        for lo in range(0, len(order), 200_000):
            part = order[lo:lo + 200_000]
            lines = [
                f'{{"reviewerID": "A{u:013d}", "asin": "B{i:09d}", "reviewerName": "Reviewer", '
                f'"helpful": [0, 0], "reviewText": {texts[u % 4]}, "overall": 5.0, "summary": "Fine", '
                f'"unixReviewTime": {t}, "reviewTime": "01 1, 2013"}}\n'
                for u, i, t in zip(user_of[part].tolist(), items[part].tolist(), times[part].tolist(), strict=True)
            ]
            f.write("".join(lines))
    meta = directory / "meta_Bench.json"
    with open(meta, "w", encoding="utf-8") as f:
        for i in range(num_items):
            entry = {"asin": f"B{i:09d}", "price": 9.99, "salesRank": {"Office Products": int(i)},
                     "categories": [["Office Products", "Office Supplies"]]}
            if i % 37 != 0:  # ~3% of items have no title and are dropped
                entry["title"] = f"Bench Product {i} &amp; Accessories" if i % 11 == 0 else f"Bench Product {i}"
            f.write(repr(entry) + "\n")
    return reviews, meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=20_000_000, help="reviews in the generated dump")
    parser.add_argument("--threads", type=int, default=2, help="parser threads of the curate stage")
    parser.add_argument("--keep", help="generate the dump into this directory and keep it")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="gdrt-bench-curate-") as tmp:
        directory = Path(args.keep or tmp)
        directory.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        reviews, meta = (
            (directory / "reviews_Bench_5.json", directory / "meta_Bench.json")
            if (directory / "reviews_Bench_5.json").is_file() and args.keep
            else generate_dump(directory, args.reviews)
        )
        size = reviews.stat().st_size
        print(f"dump: {args.reviews:,} reviews, {size / 1e9:.2f} GB ({size / args.reviews:.0f} B/review), "
              f"generated in {time.perf_counter() - t0:.1f} s")
        out = directory / "dataset"
        config = {"source": str(reviews), "meta": str(meta), "format": "amazon2014", "domain": "office",
                  "out": str(out), "threads": args.threads}
        child = (
            "import json, sys\n"
            "from gdrt_core.curate import CurateConfig, run\n"
            "m = run(CurateConfig(**json.loads(sys.argv[1])))\n"
            "print(json.dumps({'counts': m['counts'], 'stats': m['recipe']['stats'], 'timings': m['timings_s']}))\n"
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", child, json.dumps(config)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            print(done.stdout, done.stderr, file=sys.stderr)
            return done.returncode
        result = json.loads(done.stdout.strip().splitlines()[-1])
        cpu = (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime)
        stats, counts = result["stats"], result["counts"]
        print(f"curate: {wall:.1f} s wall, {args.reviews / wall / 1e6:.2f} M reviews/s, {size / wall / 1e6:.0f} MB/s; "
              f"CPU {cpu:.1f} s ({args.reviews / cpu / 1e6:.2f} M reviews per CPU-second); "
              f"peak RSS {usage.ru_maxrss / 1e6:.2f} GB")
        steps = [k for k in result["timings"] if not k.endswith(("_cpu", "_peak_rss_gb"))]
        timings = result["timings"]
        print("steps (wall s / CPU s / peak RSS GB so far): " + "; ".join(
            f"{k} {timings[k]:.1f} / {timings[k + '_cpu']:.1f} / {timings[k + '_peak_rss_gb']:.2f}" for k in steps
        ))
        parse_cpu = timings["read_reviews_cpu"]
        rest_cpu = sum(timings[k + "_cpu"] for k in steps if k != "read_reviews")
        ideal = parse_cpu / max(1, args.threads) + rest_cpu
        print(f"CPU-bound estimate on {args.threads} idle cores (parse in parallel, rest serial): {ideal:.1f} s, "
              f"{args.reviews / ideal / 1e6:.2f} M reviews/s")
        print(f"after filtering: {stats['reviews_after_kcore']:,} reviews, {stats['users']:,} users, "
              f"{stats['items']:,} items, {stats['windows']:,} windows -> train {counts['train']:,} / "
              f"valid {counts['valid']:,} / test {counts['test']:,}")
        load = os.getloadavg()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
