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
# the ranges of the stored integer columns: item ids (item_id, history, target) are int32, timestamps int64
ITEM_ID_RANGE = (-(2**31), 2**31 - 1)
TIMESTAMP_RANGE = (-(2**63), 2**63 - 1)


def range_problem(value: int, what: str, bounds: tuple[int, int]) -> str | None:
    """Why an integer does not fit its stored column (None when it fits)."""
    low, high = bounds
    if low <= value <= high:
        return None
    bits = 32 if bounds == ITEM_ID_RANGE else 64
    return f"{what} {value} is outside the range of the int{bits} column ({low}..{high})"


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

    def num_rows(self, name: str) -> int:
        """Rows of a split, from the parquet footer (nothing else is read)."""
        import pyarrow.parquet as pq

        if name not in SPLITS:
            raise GdrtError(f"unknown split {name!r}", hint=f"use one of {', '.join(SPLITS)}")
        return pq.ParquetFile(self.root / f"{name}.parquet").metadata.num_rows

    def require_examples(self, name: str, purpose: str) -> None:
        """A GdrtError naming the dataset when the split is empty (checked before any model is loaded)."""
        if not self.num_rows(name):
            raise GdrtError(f"the {name} split has no examples {purpose}", path=str(self.root))

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
    config: dict | None = None, recipe: dict | None = None, num_pop_groups: int = 5,
    popularity: dict[int, int] | None = None, **manifest_extra,
) -> dict:
    """Write the Dataset artifact into `out_dir` (which must be a fresh/temporary directory).

    `splits[name]` = columns {"example_id", "user_id", "history", "target", "timestamp"} as lists, or a
    pyarrow Table, or an iterable of record batches (written as they come, for large datasets).
    Popularity is the number of train interactions (`train_popularity`), unless `popularity` is given
    (a writer that knows the interactions exactly, e.g. the raw-dump recipe, passes its own counts).

    Checked before it is written (GdrtError): every item id fits the int32 columns, every value its
    column's type, and every history and target id is one of the items.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import write_manifest
    from gdrt_core.prompts import get_domain, prompt_template

    get_domain(domain)
    out_dir = Path(out_dir)
    ids = sorted(titles)
    for i in (ids[:1] + ids[-1:]):
        if not isinstance(i, int) or (problem := range_problem(i, "item id", ITEM_ID_RANGE)) is not None:
            raise GdrtError(problem or f"item id {i!r} is not an integer", path=str(out_dir),
                            hint="item ids are stored as int32")
    known = pa.array(ids, pa.int32())
    tables = {name: _split_table(name, splits.get(name), known) for name in SPLITS}
    pop = popularity if popularity is not None else train_popularity(titles, splits.get("train", {}))
    groups = popularity_groups(pop, num_pop_groups)
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
        table = tables[name]
        if table is None:  # record batches, checked and written as they come
            counts[name] = _write_batches(out_dir / f"{name}.parquet", splits[name], name, known)
            continue
        pq.write_table(table, out_dir / f"{name}.parquet")
        counts[name] = table.num_rows
    return write_manifest(
        out_dir, "dataset", config=config, domain=domain, prompt_template=prompt_template(domain),
        recipe=recipe or {}, counts=counts, **manifest_extra,
    )


def _typed_split(name: str, cols) -> object:
    """Split columns (dict of lists, or a pyarrow Table / RecordBatch) as a table of the split schema;
    a missing column, a null, or a value that does not fit its column's type is a GdrtError."""
    import pyarrow as pa

    schema = split_schema()
    try:
        if isinstance(cols, dict):
            table = pa.table({k: cols[k] for k in schema.names}, schema=schema)
        else:
            table = pa.Table.from_batches([cols]) if isinstance(cols, pa.RecordBatch) else cols
            table = table.select(schema.names).cast(schema)
    except KeyError as e:
        raise GdrtError(f"the {name} split has no column {e}", hint=f"columns: {', '.join(schema.names)}") from None
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, TypeError) as e:
        raise GdrtError(f"the {name} split has a value that does not fit its column type ({e})",
                        hint=f"schema: {', '.join(f'{n} {t}' for n, t in SPLIT_SCHEMA_FIELDS)}") from None
    for column in schema.names:
        if table.column(column).null_count:
            raise GdrtError(f"the {name} split has an empty (null) {column}")
    return table


def _check_item_ids(name: str, table, known, first_row: int = 0) -> None:
    """Every target and history id of the split is one of the items (else every later stage would fail)."""
    import pyarrow.compute as pc

    history = table.column("history")
    for column, values, rows in (
        ("target", table.column("target"), None),
        ("history", pc.list_flatten(history), pc.list_parent_indices(history)),
    ):
        missing = pc.invert(pc.is_in(values, value_set=known))
        if len(values) and pc.any(missing).as_py():
            index = pc.index(missing, True).as_py()
            row = first_row + (index if rows is None else rows[index].as_py())
            raise GdrtError(f"the {name} split, row {row}: {column} item id {values[index].as_py()} is not one of "
                            "the items", hint="every history and target id must have a title in the items")


def _split_table(name: str, cols, known):
    """The split as a checked table, or None for an iterable of record batches (checked while written)."""
    import pyarrow as pa

    if cols is None:
        cols = {k: [] for k, _ in SPLIT_SCHEMA_FIELDS}
    if not isinstance(cols, (dict, pa.Table)):
        return None
    table = _typed_split(name, cols)
    _check_item_ids(name, table, known)
    return table


def _write_batches(path: Path, batches, name: str, known) -> int:
    """Stream record batches (split columns) into one parquet file, each checked; returns the row count."""
    import pyarrow.parquet as pq

    rows = 0
    with pq.ParquetWriter(path, split_schema()) as writer:
        for batch in batches:
            table = _typed_split(name, batch)
            _check_item_ids(name, table, known, first_row=rows)
            writer.write_table(table)
            rows += table.num_rows
    return rows


def _overlap(previous: list[int], current: list[int]) -> int:
    """Length of the longest suffix of `previous` that is a prefix of `current`."""
    for k in range(min(len(previous), len(current)), 0, -1):
        if previous[-k:] == current[:k]:
            return k
    return 0


def train_popularity(titles: dict[int, str], train: dict[str, list]) -> dict[int, int]:
    """Interactions per item in train: each (user, position in the user's sequence) counted once.

    A sliding window repeats its user's earlier items, so counting every window's items would count one
    interaction up to 11 times, and counting distinct (user, item) pairs would miss repeat purchases.
    The user's sequence is rebuilt from the windows instead: windows of one user in time order (file
    order on ties) overlap where a suffix of the previous window equals a prefix of the next one, and
    only the items after the overlap are new interactions. For the full train split of the LLM4Rec
    recipe this is exact (each window adds its target); for a sampled train it counts the interactions
    the sample shows.
    """
    pop = dict.fromkeys(titles, 0)
    users = train.get("user_id", [])
    histories = train.get("history", [])
    targets = train.get("target", [])
    times = train.get("timestamp") or [0] * len(targets)
    by_user: dict[str, list[int]] = {}
    for row, user in enumerate(users):
        by_user.setdefault(user, []).append(row)
    for rows in by_user.values():
        rows.sort(key=lambda r: (times[r], r))
        previous: list[int] = []
        for r in rows:
            sequence = [*histories[r], targets[r]]
            for item in sequence[_overlap(previous, sequence):]:
                pop[item] = pop.get(item, 0) + 1
            previous = sequence
    return pop
