"""Benchmark raw-dump curation: generate an amazon2014-format dump, curate it, report reviews/s and peak RSS.

    python benchmarks/bench_curate.py                      # 20,000,000 reviews
    python benchmarks/bench_curate.py --reviews 2000000    # a quick run
    python benchmarks/bench_curate.py --baseline f5f53b3   # old (that commit's gdrt_core) vs new, one run
    python benchmarks/bench_curate.py --parsers            # JSON parsers on the same review lines

The dump imitates `reviews_<Category>_5.json` (one JSON object per line with reviewerID, asin,
reviewerName, helpful, reviewText, overall, summary, unixReviewTime, reviewTime) and
`meta_<Category>.json` (Python-literal lines; about 3% of items without a title, some titles with HTML
entities). Users have >= 5 reviews in time order, item popularity is long-tailed. Curation runs in a
child process, so its peak RSS and CPU time are the child's alone; the load average is printed because
the wall time depends on what else the machine runs, the CPU time much less. With --baseline REF the
same dump is also curated by gdrt_core as of git REF (`git archive` into a temporary directory), the two
alternating --repeats times; it prints the new/old ratios of the best CPU and wall times of that one run
and whether the written files are byte-identical (the sha256 of every file in the two manifests).
--parsers decodes the three review fields of the same 32 MiB of dump lines with each JSON parser that is
installed (pyarrow, the stage's parser; msgspec, orjson, pysimdjson, cysimdjson, polars, the standard
library) and prints CPU microseconds per review and the speed relative to pyarrow, measured in one run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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


def compare_parsers(reviews: Path, block_mb: int = 32, repeats: int = 3) -> dict[str, float]:
    """CPU µs per review of each installed JSON parser decoding reviewerID, asin, unixReviewTime of the
    same lines (process CPU time, so parser threads count; best of `repeats`)."""
    os.environ.setdefault("POLARS_MAX_THREADS", "1")  # one core each, as the stage's parser threads
    import io
    import json as stdlib_json

    import pyarrow as pa

    from gdrt_core.curate.amazon import REVIEW_FIELDS, _fast_parse

    with open(reviews, "rb") as f:
        block = f.read(block_mb << 20)
    block = block[: block.rfind(b"\n") + 1]
    n = block.count(b"\n")
    types = (pa.string(), pa.string(), pa.int64())
    candidates = {"pyarrow (the stage)": lambda: _fast_parse(block, REVIEW_FIELDS, types, validate=False)}
    try:
        import msgspec

        class Review(msgspec.Struct, gc=False):
            reviewerID: str
            asin: str
            unixReviewTime: int

        decode = msgspec.json.Decoder(Review).decode
        candidates["msgspec (Struct of 3 fields)"] = lambda: [decode(line) for line in block.split(b"\n")[:-1]]
    except ImportError:
        pass
    try:
        import orjson

        candidates["orjson"] = lambda: [
            (d["reviewerID"], d["asin"], d["unixReviewTime"]) for d in map(orjson.loads, block.split(b"\n")[:-1])
        ]
    except ImportError:
        pass
    try:
        import simdjson

        def pysimdjson():
            parser, out = simdjson.Parser(), []
            for line in block.split(b"\n")[:-1]:
                doc = parser.parse(line)
                out.append((doc["reviewerID"], doc["asin"], doc["unixReviewTime"]))
                del doc  # the parser is reused only once no document refers to it
            return out

        candidates["pysimdjson"] = pysimdjson
    except ImportError:
        pass
    try:
        import cysimdjson

        cy = cysimdjson.JSONParser()
        candidates["cysimdjson"] = lambda: [
            (d["reviewerID"], d["asin"], d["unixReviewTime"]) for d in map(cy.parse, block.split(b"\n")[:-1])
        ]
    except ImportError:
        pass
    try:
        import polars as pl

        schema = {"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64}
        candidates["polars read_ndjson"] = lambda: pl.read_ndjson(io.BytesIO(block), schema=schema)
    except ImportError:
        pass
    candidates["json (standard library)"] = lambda: [
        (d["reviewerID"], d["asin"], d["unixReviewTime"]) for d in map(stdlib_json.loads, block.split(b"\n")[:-1])
    ]
    results = {}
    for name, parse in candidates.items():
        best = math.inf
        for _ in range(repeats):
            t0 = time.process_time()
            parse()
            best = min(best, time.process_time() - t0)
        results[name] = best / n * 1e6
    base = results["pyarrow (the stage)"]
    print(f"JSON parsers, {n:,} review lines ({len(block) / n:.0f} B each), CPU µs per review (best of {repeats}):")
    for name, us in results.items():
        print(f"  {name:30s} {us:6.3f} µs   {base / us:5.2f}x pyarrow's speed")
    return results


CHILD = (
    "import json, resource, sys\n"
    "from gdrt_core.curate import CurateConfig, run\n"
    "m = run(CurateConfig(**json.loads(sys.argv[1])))\n"
    "rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
    "print(json.dumps({'counts': m['counts'], 'stats': m['recipe']['stats'], 'timings': m['timings_s'], 'rss': rss}))\n"
)
REPO = Path(__file__).resolve().parents[1]


def curate_once(config: dict, code_dir: Path) -> dict:
    """Curate in a child process with gdrt_core from `code_dir`: wall, CPU, peak RSS, the manifest's numbers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code_dir), os.environ.get("PYTHONPATH", "")])}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(config)], capture_output=True, text=True,
                          env=env, cwd=code_dir)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"curation with {code_dir} failed:\n{done.stdout}\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = (usage.ru_utime - before.ru_utime) + (usage.ru_stime - before.ru_stime)
    return {**result, "wall": wall, "cpu": cpu, "peak_rss_gb": result.pop("rss") / 1e6,
            "load": os.getloadavg()[0], "files": file_hashes(Path(config["out"]))}


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every parquet file of a Dataset directory (the manifest holds times, so not it)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.parquet"))}


def report(name: str, run: dict, reviews: int, size: int, threads: int) -> None:
    wall, cpu, timings = run["wall"], run["cpu"], run["timings"]
    print(f"{name}: {wall:.1f} s wall, {reviews / wall / 1e6:.2f} M reviews/s, {size / wall / 1e6:.0f} MB/s; "
          f"CPU {cpu:.1f} s ({reviews / cpu / 1e6:.2f} M reviews per CPU-second); "
          f"peak RSS {run['peak_rss_gb']:.2f} GB; load average {run['load']:.1f} at the end")
    steps = [k for k in timings if not k.endswith(("_cpu", "_peak_rss_gb"))]
    print("  steps (wall s / CPU s / peak RSS GB so far): " + "; ".join(
        f"{k} {timings[k]:.1f} / {timings[k + '_cpu']:.1f} / {timings[k + '_peak_rss_gb']:.2f}" for k in steps
    ))
    parse_cpu = timings["read_reviews_cpu"]
    rest_cpu = sum(timings[k + "_cpu"] for k in steps if k != "read_reviews")
    ideal = parse_cpu / max(1, threads) + rest_cpu
    print(f"  CPU-bound estimate on {threads} idle cores (read in parallel, rest serial): {ideal:.1f} s, "
          f"{reviews / ideal / 1e6:.2f} M reviews/s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviews", type=int, default=20_000_000, help="reviews in the generated dump")
    parser.add_argument("--threads", type=int, default=2, help="parser threads of the curate stage")
    parser.add_argument("--keep", help="generate the dump into this directory and keep it")
    parser.add_argument("--baseline", help="also curate with gdrt_core as of this git ref; print new/old ratios")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each code (alternating); best counts")
    parser.add_argument("--parsers", action="store_true", help="compare the installed JSON parsers, then stop")
    parser.add_argument("--json", help="write the measurements to this JSON file")
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
        if args.parsers:
            compare_parsers(reviews)
            return 0
        codes = {"curate": REPO}
        if args.baseline:
            old = Path(tmp) / "baseline"
            old.mkdir()
            archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "gdrt_core"],
                                     capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
            codes = {"old": old, "new": REPO}
        runs: dict[str, list[dict]] = {name: [] for name in codes}
        for _ in range(max(1, args.repeats)):
            for name, code_dir in codes.items():
                out = Path(tmp) / f"dataset-{name}"
                config = {"source": str(reviews), "meta": str(meta), "format": "amazon2014", "domain": "office",
                          "out": str(out), "threads": args.threads}
                runs[name].append(curate_once(config, code_dir))
                report(name, runs[name][-1], args.reviews, size, args.threads)
        best = {name: min(r, key=lambda r: r["cpu"]) for name, r in runs.items()}
        stats, counts = best[list(codes)[-1]]["stats"], best[list(codes)[-1]]["counts"]
        print(f"after filtering: {stats['reviews_after_kcore']:,} reviews, {stats['users']:,} users, "
              f"{stats['items']:,} items, {stats['windows']:,} windows -> train {counts['train']:,} / "
              f"valid {counts['valid']:,} / test {counts['test']:,}")
        summary = {"reviews": args.reviews, "dump_bytes": size, "threads": args.threads, "baseline": args.baseline,
                   "runs": runs}
        if "old" in best:
            cpu = min(r["cpu"] for r in runs["old"]) / min(r["cpu"] for r in runs["new"])
            wall = min(r["wall"] for r in runs["old"]) / min(r["wall"] for r in runs["new"])
            identical = all(r["files"] == runs["old"][0]["files"] for r in runs["old"] + runs["new"])
            print(f"new vs old ({args.baseline}), best of {args.repeats}: CPU {cpu:.2f}x less, wall {wall:.2f}x less; "
                  f"output files byte-identical: {identical}")
            summary.update(cpu_ratio=round(cpu, 3), wall_ratio=round(wall, 3), identical=identical)
        load = os.getloadavg()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
              f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)")
        summary["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "load": load}
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
