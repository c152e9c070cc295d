"""Reading preprocessed window files (sliding, d3): bad-row policy, CSV rows, titles, carving splits.

Every problem is reported with the file and line. With policy "error" the first bad row stops the
stage (GdrtError, exit code 2); with "drop" the row is skipped and counted by reason for the manifest.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from gdrt_core.dataset import ITEM_ID_RANGE, range_problem
from gdrt_core.errors import GdrtError
from gdrt_core.text import text_problem

BAD_ROW_HINT = "fix the row, or pass --on-bad-rows drop to skip bad rows"
MAX_EXAMPLES = 20
_SURROGATE = re.compile("[\udc80-\udcff]")
WINDOW_COLUMNS = ("user_id", "history", "target", "timestamp")  # example_id is numbered at the end


class BadRows:
    """Raise at the first bad row (policy "error") or skip it and count it by reason ("drop")."""

    def __init__(self, policy: str = "error"):
        if policy not in ("error", "drop"):
            raise GdrtError(f"on_bad_rows must be 'error' or 'drop', not {policy!r}", path="--on-bad-rows")
        self.policy = policy
        self.by_reason: Counter[str] = Counter()
        self.examples: list[dict] = []

    def bad(self, reason: str, detail: str, path: str | Path, line: int | Callable[[], int | None] | None = None) -> None:
        """Report one bad row: `reason` is the short category counted in the manifest.

        `line` may be a callable, for readers that find the line only when there is a problem.
        """
        if callable(line):
            line = line()
        if self.policy == "error":
            raise GdrtError(f"{reason}: {detail}", path=str(path), line=line, hint=BAD_ROW_HINT)
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append({"file": str(path), "line": line, "problem": f"{reason}: {detail}"})

    @property
    def dropped(self) -> int:
        return sum(self.by_reason.values())

    def report(self) -> dict:
        return {
            "policy": self.policy, "dropped": self.dropped, "by_reason": dict(sorted(self.by_reason.items())),
            "examples": self.examples,
        }


def read_text(path: Path, what: str) -> str:
    """The file as text; undecodable bytes become surrogates (found later, per line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GdrtError(f"{what} not found", path=str(path)) from None
    except IsADirectoryError:
        raise GdrtError(f"{what} is a directory, expected a file", path=str(path)) from None
    if not data.strip():
        raise GdrtError(f"empty file: expected {what}", path=str(path))
    return data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")  # no BOM


def first_non_utf8_line(text: str) -> int | None:
    match = _SURROGATE.search(text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def has_non_utf8(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def csv_rows(path: Path, required: tuple[str, ...], bad: BadRows) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: text}) for every well-formed row; wrong field counts and bytes are bad rows."""
    text = read_text(path, "a CSV file")
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except csv.Error as e:
        raise GdrtError(f"malformed CSV header ({e})", path=str(path), line=1) from None
    missing = [c for c in required if c not in header]
    if missing:
        raise GdrtError(
            f"missing column(s) {', '.join(missing)} in the header {header}", path=str(path), line=1,
            hint=f"the file must have the columns {', '.join(required)}",
        )
    rows = 0
    while True:
        start_line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            bad.bad("malformed CSV", str(e), path, start_line)
            continue
        if not fields:
            continue
        rows += 1
        if any(has_non_utf8(f) for f in fields):
            bad.bad("non-UTF-8 bytes", "the row is not valid UTF-8 text", path, start_line)
            continue
        if len(fields) != len(header):
            bad.bad("malformed CSV", f"expected {len(header)} fields, found {len(fields)}", path, start_line)
            continue
        row = dict(zip(header, fields, strict=True))
        problem = next(((c, p) for c in required if (p := text_problem(row[c])) is not None), None)
        if problem is not None:
            column, (reason, detail) = problem
            bad.bad(reason, f"column {column} {detail}", path, start_line)
            continue
        yield start_line, row
    if rows == 0:
        raise GdrtError("empty file: the CSV has a header but no rows", path=str(path))


def parse_int_list(text: str) -> list[int]:
    """'[1, 2, 3]' -> [1, 2, 3] (a Python/JSON list of int32 item ids); ValueError otherwise."""
    s = text.strip()
    if len(s) < 2 or s[0] != "[" or s[-1] != "]":
        raise ValueError(f"expected a list of item ids like [1, 2, 3], got {text[:60]!r}")
    inner = s[1:-1].strip()
    if not inner:
        return []
    try:
        ids = [int(x) for x in inner.split(",")]
    except ValueError:
        raise ValueError(f"expected a list of integer item ids, got {text[:60]!r}") from None
    for i in ids:
        if (problem := range_problem(i, "item id", ITEM_ID_RANGE)) is not None:
            raise ValueError(problem)
    return ids


def parse_int(text: str, what: str, bounds: tuple[int, int]) -> int:
    """An integer that fits its stored column (`bounds`: ITEM_ID_RANGE or TIMESTAMP_RANGE); ValueError otherwise."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{what} {text[:40]!r} is not an integer") from None
    if (problem := range_problem(value, what, bounds)) is not None:
        raise ValueError(problem)
    return value


def empty_columns() -> dict[str, list]:
    return {k: [] for k in WINDOW_COLUMNS}


def read_windows(
    path: Path,
    required: tuple[str, ...],
    parse: Callable[[dict[str, str]], tuple[str, list[int], int, int]],
    titles: dict[int, str],
    max_history: int,
    bad: BadRows,
) -> dict[str, list]:
    """Window columns of one CSV; `parse(row) -> (user, history, target, timestamp)` raises ValueError."""
    cols = empty_columns()
    for line, row in csv_rows(path, required, bad):
        try:
            user, history, target, timestamp = parse(row)
        except ValueError as e:
            bad.bad("malformed row", str(e), path, line)
            continue
        unknown = [i for i in (*history, target) if i not in titles]
        if unknown:
            bad.bad("unknown item id", f"item id {unknown[0]} has no title in the item file", path, line)
            continue
        if len(history) > max_history:
            bad.bad(
                "history too long", f"history of {len(history)} items is longer than max_history={max_history}",
                path, line,
            )
            continue
        cols["user_id"].append(user)
        cols["history"].append(history)
        cols["target"].append(target)
        cols["timestamp"].append(timestamp)
    return cols


def line_of_key(text: str, key: str) -> int | None:
    """Line of `"key":` in a JSON object text (for error messages)."""
    match = re.search(r'"' + re.escape(key) + r'"\s*:', text)
    return None if match is None else text.count("\n", 0, match.start()) + 1


def checked_title(item_id: int, title: object, path: Path, line, bad: BadRows) -> str | None:
    """The title if usable, else report it: not a string, empty, or not acceptable text (`text_problem`)."""
    if not isinstance(title, str):
        bad.bad("missing title", f"item {item_id} has no title string (found {title!r})", path, line)
        return None
    if not title.strip():
        bad.bad("empty title", f"item {item_id} has an empty title", path, line)
        return None
    problem = text_problem(title)
    if problem is not None:
        bad.bad(problem[0], f"the title of item {item_id} {problem[1]}", path, line)
        return None
    return title


def add_title(
    titles: dict[int, str], item_id: int, title: str, path: Path, line, bad: BadRows,
) -> None:
    """Add one item; the same id with a different title is a conflict (the first title is kept)."""
    old = titles.get(item_id)
    if old is None:
        titles[item_id] = title
    elif old != title:
        bad.bad("duplicate item id", f"item id {item_id} has two titles: {old!r} and {title!r}", path, line)


def carve_latest(cols: dict[str, list], size: int) -> tuple[dict[str, list], dict[str, list]]:
    """Split off the `size` latest windows by target time (ties: later rows count as later).

    Returns (remaining rows in their original order, carved rows in time order).
    """
    n = len(cols["target"])
    order = sorted(range(n), key=lambda i: (cols["timestamp"][i], i))
    carved_index = order[n - size:] if size > 0 else []
    carved_set = set(carved_index)
    keep_index = [i for i in range(n) if i not in carved_set]
    pick = lambda index: {k: [v[i] for i in index] for k, v in cols.items()}  # noqa: E731
    return pick(keep_index), pick(carved_index)
