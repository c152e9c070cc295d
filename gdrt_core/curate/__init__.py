"""The curate stage: source data -> Dataset artifact (items + train/valid/test windows + manifest).

Formats: `sliding` and `d3` (preprocessed windows, read as published) and `amazon2014` / `amazon2018`
(raw review dumps, curated with the sliding-window recipe in `recipe.py`, streamed by `amazon.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gdrt_core.config import check_config, field, to_dict

FORMATS = ("sliding", "d3", "amazon2014", "amazon2018")
POPULARITY_FROM = ("train", "sample")


def _domain_problem(name: str) -> str | None:
    from gdrt_core.prompts import DOMAINS

    return None if name in DOMAINS else f"unknown domain (use one of {', '.join(DOMAINS)})"


@dataclass
class CurateConfig:
    source: str = field(path=True, help="source directory (sliding, d3) or raw review file (amazon2014/2018)")
    format: str = field(choices=FORMATS, help="sliding | d3 | amazon2014 | amazon2018")
    out: str = field(path=True, help="output Dataset directory")
    domain: str = field("generic", check=_domain_problem, help="prompt wording: office, toys, books, clothing, games, cds, generic")
    meta: str | None = field(None, path=True, help="amazon2014/2018 metadata file (default: meta_*.json[.gz] next to the reviews)")
    name: str | None = field(None, help="d3: the dataset file stem when the source holds several")
    train_file: str | None = field(None, help="sliding: training file (default train.csv, else the largest train_<N>.csv)")
    max_history: int = field(10, ge=1, help="longest history kept per window")
    max_train: int | None = field(None, ge=1, help="sample at most this many training windows (None = all)")
    seed: int = field(42, ge=0, le=2**32 - 1, help="sampling seed")
    carve_size: int | None = field(
        None, ge=1, help="windows carved from the latest train for a missing valid/test split (None = size of the other)",
    )
    on_bad_rows: str = field("error", choices=("error", "drop"), help="error: stop at the first bad row; drop: skip and count bad rows")
    num_pop_groups: int = field(5, ge=1, le=127, help="equal-size popularity groups of items (fairness metrics; int8)")
    popularity_from: str = field(
        "train", choices=POPULARITY_FROM,
        help="items' popularity (groups, most-popular baseline): train = interactions in the whole training split, "
             "before max_train sampling; sample = in the sampled training windows only",
    )
    k_core: int = field(5, ge=1, help="raw: iterative k-core, every user and item keeps >= k interactions")
    window_rule: str = field(
        "bigrec", choices=("bigrec", "all"), help="raw: bigrec = targets from position min(max_history, n-1) on (LLM4Rec); all = every target",
    )
    valid_fraction: float = field(0.1, ge=0, lt=1, help="raw: share of windows (latest by target time but test) for valid")
    test_fraction: float = field(0.1, ge=0, lt=1, help="raw: share of the latest windows for test")
    min_title_chars: int = field(2, ge=0, help="raw: items whose stripped title is shorter are dropped as untitled")
    unescape_titles: bool = field(True, help="raw: unescape HTML entities in titles (&amp; -> &)")
    strip_vhs: bool = field(True, help="raw: strip a trailing ' VHS' / ' [VHS]' from titles, as the reference")
    threads: int = field(2, ge=1, help="raw: parser threads")
    block_mb: int = field(32, ge=1, le=1024, help="raw: bytes per parsed block (MiB); memory grows with threads * block")

    def check(self, source: str) -> None:
        from gdrt_core.errors import GdrtError

        if self.valid_fraction + self.test_fraction >= 1:
            raise GdrtError(f"settings valid_fraction={self.valid_fraction} and test_fraction={self.test_fraction} "
                            "leave no training windows", path=source, hint="their sum must be below 1")



def run(config: CurateConfig) -> dict:
    """Curate `config.source` into `config.out`; returns the manifest.

    Nothing is written to `config.out` unless the whole stage succeeds.
    """
    from gdrt_core.artifacts import atomic_output_dir, check_output
    from gdrt_core.curate.rows import BadRows

    check_config(config, "curate config")
    guard = {"kind": "dataset", "inputs": {"source": config.source, "meta": config.meta}}
    check_output(config.out, **guard)
    bad = BadRows(config.on_bad_rows)
    if config.format in ("amazon2014", "amazon2018"):
        from gdrt_core.curate.amazon import curate_raw

        with atomic_output_dir(config.out, **guard) as tmp:
            return curate_raw(config, tmp, bad)
    if config.format == "sliding":
        from gdrt_core.curate.sliding import read_sliding

        titles, splits, report = read_sliding(config, bad)
    else:
        from gdrt_core.curate.d3 import read_d3

        titles, splits, report = read_d3(config, bad)
    final, split_report, popularity = complete_splits(config, titles, splits)
    from gdrt_core.dataset import write_dataset

    with atomic_output_dir(config.out, **guard) as tmp:
        return write_dataset(
            tmp, titles=titles, splits=final, domain=config.domain, config=to_dict(config),
            recipe={"format": config.format, **report, "popularity": split_report.pop("popularity"),
                    "splits": split_report, "bad_rows": bad.report()},
            num_pop_groups=config.num_pop_groups, popularity=popularity,
        )


def popularity_note(windows: int | None = None, sampled: bool = False) -> str:
    """The manifest's `recipe.popularity`: which training windows the items' popularity counts (`windows` of
    them; None: the whole train split, not sampled)."""
    which = ("train windows" if windows is None
             else f"{windows} sampled train windows" if sampled else f"{windows} train windows before sampling")
    return f"interactions of the {which}, each (user, position) once"


def complete_splits(config: CurateConfig, titles: dict[int, str], splits: dict) -> tuple[dict, dict, dict | None]:
    """Carve missing valid/test from the latest train, sample train, number the examples.

    Returns (splits, what happened to each split, popularity override or None). Popularity counts the
    interactions of the whole training split (after carving, before sampling) unless
    `popularity_from="sample"`, which counts the sampled windows only; `recipe.popularity` in the manifest
    says which. A source without a training split is kept as an eval-only dataset (empty train);
    popularity then counts the interactions of the splits present.
    """
    from gdrt_core.curate.recipe import sample_rows
    from gdrt_core.curate.rows import carve_latest, empty_columns
    from gdrt_core.dataset import train_popularity
    from gdrt_core.errors import GdrtError

    report: dict = {}
    train = splits.get("train")
    for name in ("train", "valid", "test"):
        if splits.get(name) is not None:
            report[name] = {"source": "file", "rows": len(splits[name]["target"])}
    popularity = None
    if train is None:
        report["train"] = {"source": "missing: eval-only dataset, train is empty", "rows": 0}
        present = [splits[n] for n in ("valid", "test") if splits.get(n) is not None]
        if not present:
            raise GdrtError("no split files found (train, valid or test)", path=config.source)
        merged = {k: [v for s in present for v in s[k]] for k in ("user_id", "history", "target")}
        popularity = train_popularity(titles, merged)
        report["popularity"] = "interactions of the valid and test windows (no train split), each (user, position) once"
        train = empty_columns()
        splits = {**splits, "train": train}
        for name in ("valid", "test"):
            if splits.get(name) is None:
                splits[name] = empty_columns()
                report[name] = {"source": "missing (no train to carve it from)", "rows": 0}
    else:
        # carve test first (the latest windows), then valid from what is left
        for name, other in (("test", "valid"), ("valid", "test")):
            if splits.get(name) is not None:
                continue
            size = config.carve_size
            if size is None:
                size = len(splits[other]["target"]) if splits.get(other) is not None else len(train["target"]) // 10
            if size >= len(train["target"]):
                raise GdrtError(
                    f"cannot carve {size} {name} windows from {len(train['target'])} training windows",
                    path=config.source, hint="set a smaller carve_size (--set carve_size=N)",
                )
            train, carved = carve_latest(train, size)
            splits = {**splits, name: carved}
            report[name] = {"source": "carved from the latest training windows by target time", "rows": size}
        report["train"]["rows_after_carving"] = len(train["target"])
    sample = sample_rows(len(train["target"]), config.max_train, config.seed)
    if sample is not None:
        if config.popularity_from == "train":
            popularity = train_popularity(titles, train)
            report["popularity"] = popularity_note(len(train["target"]))
        else:
            report["popularity"] = popularity_note(len(sample), sampled=True)
        train = {k: [v[i] for i in sample] for k, v in train.items()}
        report["train"]["sampled"] = {"rows": len(sample), "seed": config.seed, "method": "pandas DataFrame.sample"}
    elif "popularity" not in report:
        report["popularity"] = popularity_note()
    splits = {**splits, "train": train}
    next_id = 0
    for name in ("train", "valid", "test"):
        n = len(splits[name]["target"])
        splits[name]["example_id"] = list(range(next_id, next_id + n))
        next_id += n
    return splits, report, popularity


def summary_line(config: CurateConfig, manifest: dict) -> str:
    """The one line `gdrt curate` prints."""
    c = manifest["counts"]
    dropped = manifest["recipe"].get("bad_rows", {}).get("dropped", 0)
    return (
        f"curated {config.source} -> {config.out}: {c['items']} items, train {c['train']}, valid {c['valid']}, "
        f"test {c['test']}" + (f" ({dropped} bad rows dropped)" if dropped else "")
    )
