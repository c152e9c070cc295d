"""Reading the Dataset artifact (written by `gdrt curate`), for every later stage.

Layout: items.parquet (item_id int32, title string, popularity int32, pop_group int8),
{train,valid,test}.parquet (example_id int64, user_id string, history list<int32>, target int32,
timestamp int64), manifest.json (kind "dataset"; "domain", "prompt_template", "recipe", "counts").
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from gdrt_core.artifacts import read_manifest
from gdrt_core.errors import GdrtError

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Example:
    example_id: int
    history: tuple[int, ...]  # item ids, oldest first
    target: int
    history_titles: tuple[str, ...]
    target_title: str


class Dataset:
    """A curated dataset directory. Cheap to open; tables are read on first use."""

    def __init__(self, root: str | os.PathLike, *, verify: bool = True):
        self.root = Path(root)
        self.manifest = read_manifest(self.root, "dataset", verify=verify)
        self.domain: str = self.manifest["domain"]

    @cached_property
    def items(self):
        import pyarrow.parquet as pq

        return pq.read_table(self.root / "items.parquet")

    @cached_property
    def titles(self) -> dict[int, str]:
        t = self.items
        return dict(zip(t.column("item_id").to_pylist(), t.column("title").to_pylist(), strict=True))

    @cached_property
    def pop_groups(self) -> dict[int, int]:
        t = self.items
        return dict(zip(t.column("item_id").to_pylist(), t.column("pop_group").to_pylist(), strict=True))

    def split(self, name: str):
        """The split as a pyarrow Table."""
        import pyarrow.parquet as pq

        if name not in SPLITS:
            raise GdrtError(f"unknown split {name!r}", hint=f"use one of {', '.join(SPLITS)}")
        return pq.read_table(self.root / f"{name}.parquet")

    def examples(self, name: str, limit: int | None = None) -> list[Example]:
        t = self.split(name)
        if limit is not None:
            t = t.slice(0, limit)
        titles = self.titles
        out = []
        for eid, hist, tgt in zip(
            t.column("example_id").to_pylist(), t.column("history").to_pylist(), t.column("target").to_pylist(),
            strict=True,
        ):
            out.append(Example(eid, tuple(hist), tgt, tuple(titles[h] for h in hist), titles[tgt]))
        return out


ITEM_SCHEMA_FIELDS = (("item_id", "int32"), ("title", "string"), ("popularity", "int32"), ("pop_group", "int8"))
SPLIT_SCHEMA_FIELDS = (
    ("example_id", "int64"), ("user_id", "string"), ("history", "list<int32>"), ("target", "int32"),
    ("timestamp", "int64"),
)


def item_schema():
    import pyarrow as pa

    return pa.schema([("item_id", pa.int32()), ("title", pa.string()), ("popularity", pa.int32()), ("pop_group", pa.int8())])


def split_schema():
    import pyarrow as pa

    return pa.schema([
        ("example_id", pa.int64()), ("user_id", pa.string()), ("history", pa.list_(pa.int32())),
        ("target", pa.int32()), ("timestamp", pa.int64()),
    ])


def popularity_groups(popularity: dict[int, int], num_groups: int = 5) -> dict[int, int]:
    """Equal-size item groups by popularity (0 = least popular); ties broken by item id.

    Items sorted by (popularity, item_id) ascending are cut into `num_groups` contiguous chunks whose
    sizes differ by at most one (the first `n % num_groups` chunks get one more item).
    """
    order = sorted(popularity, key=lambda i: (popularity[i], i))
    n = len(order)
    base, extra = divmod(n, num_groups)
    groups: dict[int, int] = {}
    start = 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        for i in order[start:start + size]:
            groups[i] = g
        start += size
    return groups


def write_dataset(
    out_dir, *, titles: dict[int, str], splits: dict[str, dict[str, list]], domain: str,
    config: dict | None = None, recipe: dict | None = None, num_pop_groups: int = 5, **manifest_extra,
) -> dict:
    """Write the Dataset artifact into `out_dir` (which must be a fresh/temporary directory).

    `splits[name]` = columns {"example_id", "user_id", "history", "target", "timestamp"}. Popularity is
    the number of train interactions (history items and targets of the train windows are counted once per
    window they appear as the target; see `train_popularity`).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import write_manifest
    from gdrt_core.prompts import get_domain, prompt_template

    get_domain(domain)
    out_dir = Path(out_dir)
    pop = train_popularity(titles, splits.get("train", {}))
    groups = popularity_groups(pop, num_pop_groups)
    ids = sorted(titles)
    items = pa.table(
        {
            "item_id": pa.array(ids, pa.int32()),
            "title": pa.array([titles[i] for i in ids], pa.string()),
            "popularity": pa.array([pop[i] for i in ids], pa.int32()),
            "pop_group": pa.array([groups[i] for i in ids], pa.int8()),
        },
        schema=item_schema(),
    )
    pq.write_table(items, out_dir / "items.parquet")
    counts = {"items": len(ids)}
    for name in SPLITS:
        cols = splits.get(name) or {k: [] for k, _ in SPLIT_SCHEMA_FIELDS}
        table = pa.table({k: cols[k] for k, _ in SPLIT_SCHEMA_FIELDS}, schema=split_schema())
        pq.write_table(table, out_dir / f"{name}.parquet")
        counts[name] = table.num_rows
    return write_manifest(
        out_dir, "dataset", config=config, domain=domain, prompt_template=prompt_template(domain),
        recipe=recipe or {}, counts=counts, **manifest_extra,
    )


def train_popularity(titles: dict[int, str], train: dict[str, list]) -> dict[int, int]:
    """Interactions per item in train: each distinct (user, item) interaction visible in the train windows.

    A sliding window repeats its user's earlier items, so counting every window's history would count an
    interaction many times. An interaction is (user_id, item_id, position in the user's sequence) —
    approximated here as the distinct (user_id, item_id) pairs over train histories and targets.
    """
    seen: set[tuple[str, int]] = set()
    pop = dict.fromkeys(titles, 0)
    for user, hist, tgt in zip(train.get("user_id", []), train.get("history", []), train.get("target", []), strict=True):
        for item in (*hist, tgt):
            if (user, item) not in seen:
                seen.add((user, item))
                pop[item] = pop.get(item, 0) + 1
    return pop
