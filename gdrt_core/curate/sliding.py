"""The `sliding` source format (LLM4Rec sliding windows: LBR, MSL, LLM4DSR).

A directory with `{train,valid,test}.csv` (columns `user_id,item_ids,timestamp`, where `item_ids` is a
list whose last id is the target and the ids before it the history, oldest first; extra columns such
as `mask` or `item_titles` are ignored) and `id2name4Rec.json` (`{"<item id>": "<title>"}`).

Real variants: only sampled training files (`train_10000.csv`, `train_5000.csv`): the full
`train.csv` is used when present, otherwise the largest `train_<N>.csv`; a missing valid or test split
is carved from the latest training windows (`rows.carve_latest`). Titles are kept as published (HTML
entities such as `&amp;` included) so prompts match the published data.
"""

from __future__ import annotations

import ast
import functools
import json
import re
from pathlib import Path

from gdrt_core.curate.rows import (
    BadRows,
    add_title,
    checked_title,
    csv_rows,
    line_of_key,
    parse_int,
    parse_int_list,
    read_text,
    read_windows,
)
from gdrt_core.dataset import ITEM_ID_RANGE, TIMESTAMP_RANGE
from gdrt_core.errors import GdrtError
from gdrt_core.text import text_problem

TITLE_FILES = ("id2name4Rec.json", "id2name.json")
_SAMPLED = re.compile(r"^(train|valid|test)_(\d+)\.csv$")


def split_file(src: Path, split: str, explicit: str | None = None) -> Path | None:
    """`<split>.csv` if present, else the largest sample `<split>_<N>.csv`, else None."""
    if explicit:
        path = src / explicit
        if not path.is_file():
            raise GdrtError(f"the {split} file {explicit!r} does not exist", path=str(src))
        return path
    full = src / f"{split}.csv"
    if full.is_file():
        return full
    sampled = []
    for p in src.glob(f"{split}_*.csv"):
        m = _SAMPLED.match(p.name)
        if m and m.group(1) == split:
            sampled.append((int(m.group(2)), p))
    return max(sampled)[1] if sampled else None


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs."""


def read_titles(path: Path, bad: BadRows) -> dict[int, str]:
    """{item id: title} from an id2name JSON object; duplicate keys with different titles are an error."""
    text = read_text(path, "an item titles file (id2name4Rec.json)")
    try:
        # keep every (key, value) pair: a plain dict would hide duplicate ids
        top = json.loads(text, object_pairs_hook=_Pairs)
    except json.JSONDecodeError as e:
        raise GdrtError(f"not valid JSON: {e.msg}", path=str(path), line=e.lineno) from None
    if not isinstance(top, _Pairs):
        raise GdrtError('expected a JSON object {"<item id>": "<title>"}', path=str(path))
    titles: dict[int, str] = {}
    for key, value in top:
        line = functools.partial(line_of_key, text, key)
        try:
            item_id = parse_int(key, "item id", ITEM_ID_RANGE)
        except ValueError as e:
            bad.bad("malformed row", str(e), path, line)
            continue
        title = checked_title(item_id, value, path, line, bad)
        if title is not None:
            add_title(titles, item_id, title, path, line, bad)
    if not titles:
        raise GdrtError("no usable item titles", path=str(path))
    return titles


def titles_from_rows(path: Path, titles: dict[int, str], bad: BadRows) -> int:
    """Fill ids missing from a lossy id2name.json with the CSV's `item_titles` column; returns how many.

    Titles there that are not acceptable text (`text.text_problem`) are not used.
    """
    with open(path, encoding="utf-8", errors="replace") as f:
        if "item_titles" not in f.readline():
            return 0
    added = 0
    for _line, row in csv_rows(path, ("item_ids", "item_titles"), BadRows("drop")):
        try:
            ids = parse_int_list(row["item_ids"])
            row_titles = ast.literal_eval(row["item_titles"])
        except (ValueError, SyntaxError):
            continue
        if not isinstance(row_titles, list) or len(row_titles) != len(ids):
            continue
        for item_id, title in zip(ids, row_titles, strict=True):
            if item_id not in titles and isinstance(title, str) and title.strip() and text_problem(title) is None:
                titles[item_id] = title
                added += 1
    return added


def parse_sliding_row(row: dict[str, str]) -> tuple[str, list[int], int, int]:
    ids = parse_int_list(row["item_ids"])
    if not ids:
        raise ValueError("item_ids is empty: a window needs at least its target")
    user = row["user_id"].strip()
    if not user:
        raise ValueError("user_id is empty")
    return user, ids[:-1], ids[-1], parse_int(row["timestamp"], "timestamp", TIMESTAMP_RANGE)


def read_sliding(config, bad: BadRows) -> tuple[dict[int, str], dict[str, dict[str, list] | None], dict]:
    """Titles, the splits present in the source (None = missing) and what was read (for the manifest)."""
    src = Path(config.source)
    if not src.is_dir():
        raise GdrtError("the sliding source must be a directory with train.csv and id2name4Rec.json", path=str(src))
    title_path = next((src / n for n in TITLE_FILES if (src / n).is_file()), None)
    if title_path is None:
        raise GdrtError("item titles file id2name4Rec.json not found", path=str(src))
    titles = read_titles(title_path, bad)
    files = {
        "train": split_file(src, "train", config.train_file),
        "valid": split_file(src, "valid"),
        "test": split_file(src, "test"),
    }
    report: dict = {"titles_file": title_path.name, "files": {k: (v.name if v else None) for k, v in files.items()}}
    if title_path.name == "id2name.json":
        # id2name.json keeps one id per title; the rows' own titles fill the ids it lost.
        report["titles_from_rows"] = sum(titles_from_rows(p, titles, bad) for p in files.values() if p is not None)
    splits: dict[str, dict[str, list] | None] = {}
    for name, path in files.items():
        splits[name] = (
            None if path is None
            else read_windows(path, ("user_id", "item_ids", "timestamp"), parse_sliding_row, titles, config.max_history, bad)
        )
    return titles, splits, report
