"""The `d3` source format (DecodingMatters `process.py`; R3, Engram4Rec, IGD use it).

Layout: `{train,valid,test}/<name>.csv` and `info/<name>.txt`. The CSVs have (among others) the
columns `user_id`, `history_item_id` (a list of at most 10 ids, oldest first), `item_id` (the
target) and `timestamp` (of the target); `info/<name>.txt` has one `title<TAB>item_id` line per item
(ids 0..N-1). Ids are kept as published; titles too (HTML entities and all).
"""

from __future__ import annotations

from pathlib import Path

from gdrt_core.curate.rows import (
    BadRows,
    add_title,
    checked_title,
    has_non_utf8,
    parse_int,
    parse_int_list,
    read_text,
    read_windows,
)
from gdrt_core.dataset import ITEM_ID_RANGE, TIMESTAMP_RANGE
from gdrt_core.errors import GdrtError

D3_COLUMNS = ("user_id", "history_item_id", "item_id", "timestamp")


def dataset_name(src: Path, explicit: str | None) -> str:
    """The file stem shared by info/ and the split folders (`--set name=...` when there are several)."""
    if explicit:
        return explicit
    stems = {p.stem for split in ("train", "valid", "test") for p in (src / split).glob("*.csv")}
    stems &= {p.stem for p in (src / "info").glob("*.txt")}
    if len(stems) == 1:
        return stems.pop()
    if not stems:
        raise GdrtError(
            "no d3 dataset here: expected info/<name>.txt and {train,valid,test}/<name>.csv", path=str(src),
        )
    raise GdrtError(
        f"several d3 datasets here: {', '.join(sorted(stems))}", path=str(src),
        hint="choose one with --set name=<name>",
    )


def read_info(path: Path, bad: BadRows) -> dict[int, str]:
    """{item id: title} from `title<TAB>item_id` lines."""
    text = read_text(path, "a d3 item file (title<TAB>item_id lines)")
    titles: dict[int, str] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if has_non_utf8(line):
            bad.bad("non-UTF-8 bytes", "the line is not valid UTF-8 text", path, lineno)
            continue
        if "\t" not in line:
            bad.bad("malformed row", "expected title<TAB>item_id", path, lineno)
            continue
        title, raw_id = line.rsplit("\t", 1)
        try:
            item_id = parse_int(raw_id, "item id", ITEM_ID_RANGE)
        except ValueError as e:
            bad.bad("malformed row", str(e), path, lineno)
            continue
        title = checked_title(item_id, title, path, lineno, bad)
        if title is not None:
            add_title(titles, item_id, title, path, lineno, bad)
    if not titles:
        raise GdrtError("no usable item titles", path=str(path))
    return titles


def parse_d3_row(row: dict[str, str]) -> tuple[str, list[int], int, int]:
    user = row["user_id"].strip()
    if not user:
        raise ValueError("user_id is empty")
    history = parse_int_list(row["history_item_id"])
    return (user, history, parse_int(row["item_id"], "item_id", ITEM_ID_RANGE),
            parse_int(row["timestamp"], "timestamp", TIMESTAMP_RANGE))


def read_d3(config, bad: BadRows) -> tuple[dict[int, str], dict[str, dict[str, list] | None], dict]:
    src = Path(config.source)
    if not src.is_dir():
        raise GdrtError("the d3 source must be a directory with info/ and train/ valid/ test/", path=str(src))
    name = dataset_name(src, config.name)
    titles = read_info(src / "info" / f"{name}.txt", bad)
    splits: dict[str, dict[str, list] | None] = {}
    files: dict[str, str | None] = {}
    for split in ("train", "valid", "test"):
        path = src / split / f"{name}.csv"
        if not path.is_file():
            splits[split], files[split] = None, None
            continue
        files[split] = f"{split}/{name}.csv"
        splits[split] = read_windows(path, D3_COLUMNS, parse_d3_row, titles, config.max_history, bad)
    return titles, splits, {"name": name, "titles_file": f"info/{name}.txt", "files": files}
