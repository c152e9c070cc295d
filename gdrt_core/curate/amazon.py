"""Raw Amazon review dumps (2014 and 2018 releases) -> Dataset, streamed.

Reviews are JSON lines (optionally .gz). Worker threads each read a byte range of whole lines
(`read_line_range`, into a buffer the thread reuses) and parse it with pyarrow's JSON reader (only
reviewerID, asin and unixReviewTime; other fields are ignored), and dictionary-encode the two id
columns at once (the id checks then run on the block dictionaries, not on every row); the block
dictionaries are merged into one (`IdCoder`). So the dump is never held as Python objects: what
stays in memory is two int32 codes and one int64 time per review, plus the distinct ids. A block the
fast parser rejects is re-read line by line to name the bad line (or to drop it).

Metadata: 2014 lines are Python literals (`{'asin': ..., 'title': ...}`): RE2 patterns in pyarrow
find the two literals per block, and only the wanted items, and the lines the patterns cannot vouch
for (checked with `ast.literal_eval`), reach Python. 2018 lines are JSON, read like the reviews. The
recipe itself (k-core, windows, split) is in `recipe.py`.
"""

from __future__ import annotations

import ast
import functools
import gzip
import html
import json
import math
import os
import resource
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gdrt_core.curate import popularity_note, recipe
from gdrt_core.curate.rows import BadRows
from gdrt_core.dataset import TIMESTAMP_RANGE, range_problem
from gdrt_core.errors import GdrtError
from gdrt_core.text import CONTROL_RE2, text_problem

REVIEW_FIELDS = ("reviewerID", "asin", "unixReviewTime")
BATCH_WINDOWS = 1 << 20  # windows per written parquet batch


def open_binary(path: Path):
    try:
        return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except FileNotFoundError:
        raise GdrtError("file not found", path=str(path)) from None


def line_blocks(path: Path, block_bytes: int) -> Iterator[bytes]:
    """Blocks of whole lines (about `block_bytes` each) of a possibly gzipped file."""
    with open_binary(path) as f:
        while True:
            try:
                block = f.read(block_bytes)
                if block and not block.endswith(b"\n"):
                    block += f.readline()  # finish the last line
            except (OSError, EOFError) as e:
                raise GdrtError(f"cannot read the file ({e})", path=str(path)) from None
            if not block:
                return
            yield block if block.endswith(b"\n") else block + b"\n"


def read_line_range(
    fd: int, start: int, end: int, size: int, slack: int = 1 << 20, buffer: bytearray | None = None,
) -> memoryview:
    """The whole lines whose first byte lies in [start, end) of a file of `size` bytes (os.pread).

    Consecutive ranges give every line exactly once, so workers can read their own blocks. With
    `buffer` (a bytearray the caller reuses for its next block, see `_thread_buffer`) the first read goes
    into it: no fresh allocation, so no page faults on every block; the result is then a view into it.
    """
    lo = max(start - 1, 0)  # the byte before `start` tells whether a line starts at `start`
    want = min(end, size) - lo + slack
    if buffer is not None and len(buffer) >= want:
        data = memoryview(buffer)[:os.preadv(fd, [memoryview(buffer)[:want]], lo)]
    else:
        data = os.pread(fd, want, lo)

    def find_newline(frm: int) -> int:
        nonlocal data
        while (j := _find(data, frm)) == -1 and lo + len(data) < size:
            data = bytes(data) + os.pread(fd, slack, lo + len(data))  # a line longer than the slack: rare
        return j

    first = 0
    if start > 0:
        nl = find_newline(0)
        if nl == -1:
            return memoryview(b"")
        first = nl + 1
    if lo + first >= end:
        return memoryview(b"")
    last = find_newline(min(end, size) - 1 - lo)
    if last == -1:  # the file does not end with a newline
        data = bytes(data) + b"\n"
        last = len(data) - 1
    return memoryview(data)[first:last + 1]


def _find(data, frm: int) -> int:
    """data.find(b"\n", frm) for bytes or a memoryview (which has no find)."""
    return data.find(b"\n", frm) if isinstance(data, bytes) else data.obj.find(b"\n", frm, len(data))


_BUFFERS = threading.local()


def _thread_buffer(nbytes: int) -> bytearray:
    """This thread's read buffer, at least `nbytes` long (one per parser thread, reused block after block)."""
    buffer = getattr(_BUFFERS, "buffer", None)
    if buffer is None or len(buffer) < nbytes:
        buffer = _BUFFERS.buffer = bytearray(nbytes)
    return buffer


def count_lines(block: bytes) -> int:
    data = np.frombuffer(block, dtype=np.uint8)
    # the comparison goes into this thread's reused scratch array: a fresh 32 MB array per block would
    # cost more in page faults than the comparison itself
    scratch = getattr(_BUFFERS, "newlines", None)
    if scratch is None or len(scratch) < len(data):
        scratch = _BUFFERS.newlines = np.empty(len(data), dtype=bool)
    return int(np.count_nonzero(np.equal(data, 10, out=scratch[:len(data)])))


@dataclass
class ParsedBlock:
    """One block's reviews: dictionary-encoded ids, times, and its bad lines (reason, detail, line in block)."""

    users: object  # pa.DictionaryArray
    items: object  # pa.DictionaryArray
    times: np.ndarray  # [rows] int64
    lines: int
    bad: list[tuple[str, str, int]] = field(default_factory=list)


def _fast_parse(block: bytes, names: tuple[str, ...], types: tuple, validate: bool = True):
    """pyarrow JSON parse of the named fields, or None when the block needs the line-by-line path.

    validate=False leaves the UTF-8 check of the string columns to the caller (pyarrow does not check
    UTF-8 while parsing): `parse_review_block` checks the block dictionaries instead, which is the same
    check on fewer strings.
    """
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema(list(zip(names, types, strict=True)))
    try:
        table = pj.read_json(
            pa.BufferReader(block),
            read_options=pj.ReadOptions(use_threads=False, block_size=len(block) + 1),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
        for column in table.columns if validate else ():
            column.validate(full=True)  # pyarrow does not check UTF-8 while parsing
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeDecodeError):
        return None
    return table


def _slow_lines(block: bytes, names: tuple[str, ...], required: tuple[str, ...], checks):
    """Line-by-line parse: (rows as (line in block, {name: value}), bad lines).

    `checks[name](value)` -> None, or (reason, detail) of a bad value.
    """
    rows: list[tuple[int, dict]] = []
    bad: list[tuple[str, str, int]] = []
    for offset, raw in enumerate(bytes(block).split(b"\n")[:-1]):
        line = offset + 1
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(("non-UTF-8 bytes", f"byte {e.start} of the line is not valid UTF-8", line))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            bad.append(("malformed JSON", f"{e.msg} at column {e.colno}", line))
            continue
        if not isinstance(obj, dict):
            bad.append(("malformed JSON", "expected one JSON object per line", line))
            continue
        missing = [n for n in required if obj.get(n) is None]
        if missing:
            bad.append(("missing field", f"no {', '.join(missing)}", line))
            continue
        problem = next((p for n in names if (p := checks[n](obj.get(n))) is not None), None)
        if problem is not None:
            bad.append((*problem, line))
            continue
        rows.append((line, {n: obj.get(n) for n in names}))
    return rows, bad


def _check_id(value) -> tuple[str, str] | None:
    if not isinstance(value, str) or not value.strip():
        return "malformed row", f"id {value!r} is not a non-empty string"
    problem = text_problem(value)
    return None if problem is None else (problem[0], f"id {value!r} {problem[1]}")


def _check_time(value) -> tuple[str, str] | None:
    """unixReviewTime must be an integer (NaN, Infinity and fractions are not) that fits the int64 column."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "malformed row", f"unixReviewTime {value!r} is not an integer"
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return "malformed row", f"unixReviewTime {value!r} is not an integer"
    problem = range_problem(int(value), "unixReviewTime", TIMESTAMP_RANGE)
    return None if problem is None else ("malformed row", problem)



def parse_review_block(block: bytes) -> ParsedBlock:
    """Parse and dictionary-encode one block of review lines (runs in a worker thread)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    lines = count_lines(block)
    table = _fast_parse(block, REVIEW_FIELDS, (pa.string(), pa.string(), pa.int64()), validate=False)
    bad: list[tuple[str, str, int]] = []
    if table is not None and all(c.null_count == 0 for c in table.columns):
        users = pc.dictionary_encode(table.column(0).combine_chunks())
        items = pc.dictionary_encode(table.column(1).combine_chunks())
        # every check on the distinct values only: a row fails exactly when its dictionary entry does
        if _clean_ids(users.dictionary) and _clean_ids(items.dictionary):
            return ParsedBlock(users, items, table.column(2).to_numpy().astype(np.int64, copy=False), lines)
    checks = {"reviewerID": _check_id, "asin": _check_id, "unixReviewTime": _check_time}
    rows, bad = _slow_lines(block, REVIEW_FIELDS, REVIEW_FIELDS, checks)
    users = pa.array([r["reviewerID"] for _, r in rows], pa.string())
    items = pa.array([r["asin"] for _, r in rows], pa.string())
    times = np.array([int(r["unixReviewTime"]) for _, r in rows], dtype=np.int64)
    return ParsedBlock(pc.dictionary_encode(users), pc.dictionary_encode(items), times, lines, bad)


def _clean_ids(values) -> bool:
    """Valid UTF-8, none empty, no control character that `text_problem` refuses (else the block takes
    the line-by-line path). Checked on the bytes with numpy: the controls are the bytes 0x00-0x1f but tab
    and newline, 0x7f, and U+0080-U+009F (0xc2 0x80-0x9f); any other non-ASCII byte sends the values to
    pyarrow's UTF-8 check and the RE2 pattern of the controls."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(values) == 0:
        return True
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)[values.offset:values.offset + len(values) + 1]
    if np.any(offsets[1:] == offsets[:-1]):
        return False  # an empty id
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)[offsets[0]:offsets[-1]]
    if data.max(initial=0) < 0x7f and data.min(initial=0x20) >= 0x20:
        return True  # printable ASCII: valid UTF-8 and no control character
    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return not pc.any(pc.match_substring_regex(values, CONTROL_RE2)).as_py()


def parallel_blocks(path: Path, block_bytes: int, threads: int, parse) -> Iterator:
    """parse(block) over the file's blocks, `threads` at a time, results in file order.

    Plain files: each worker reads its own byte range (no copy through the main thread). Gzipped
    files are decompressed in order by the main thread.
    """
    threads = max(1, threads)
    fd = None
    if path.suffix == ".gz":
        jobs = (functools.partial(parse, block) for block in line_blocks(path, block_bytes))
    else:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise GdrtError("file not found", path=str(path)) from None
        size = os.fstat(fd).st_size
        jobs = (
            functools.partial(
                lambda s, e: parse(read_line_range(fd, s, e, size, buffer=_thread_buffer(block_bytes + (1 << 20)))),
                start, start + block_bytes,
            )
            for start in range(0, size, block_bytes)
        )
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            pending: deque = deque()
            try:
                for job in jobs:
                    pending.append(pool.submit(job))
                    if len(pending) > threads:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for future in pending:
                    future.cancel()
    finally:  # after the pool has finished every started read
        if fd is not None:
            os.close(fd)


@dataclass
class Reviews:
    """All reviews as codes into the distinct ids (first-appearance order) and times."""

    user_codes: np.ndarray  # [n] int32
    item_codes: np.ndarray  # [n] int32
    times: np.ndarray  # [n] int64
    user_ids: object  # pa.StringArray [num_users]
    asins: object  # pa.StringArray [num_items]
    lines: int


class IdCoder:
    """Maps the per-block dictionaries of one string column onto one global dictionary.

    Pending block dictionaries are merged (pyarrow `unify_dictionaries`, the global dictionary first so
    its codes stay) once they hold as many entries as the global dictionary (at least `min_merge`):
    memory stays within about twice the distinct values, and each value is re-hashed only a logarithmic
    number of times. Codes are in order of first appearance in the file.
    """

    def __init__(self, min_merge: int = 1 << 20):
        self.min_merge = min_merge
        self.dictionary = None  # pa.StringArray of the values seen so far
        self.pending: list = []  # block DictionaryArrays not merged yet
        self.pending_entries = 0
        self.codes: list[np.ndarray] = []  # int32 codes per merged block

    def add(self, block_column) -> None:
        self.pending.append(block_column)
        self.pending_entries += len(block_column.dictionary)
        known = 0 if self.dictionary is None else len(self.dictionary)
        if self.pending_entries >= max(known, self.min_merge):
            self.merge()

    def merge(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        chunks = self.pending
        if self.dictionary is not None:
            identity = pa.DictionaryArray.from_arrays(pa.array(np.arange(len(self.dictionary), dtype=np.int32)), self.dictionary)
            chunks = [identity, *chunks]
        unified = pa.chunked_array(chunks).unify_dictionaries()
        self.dictionary = unified.chunk(0).dictionary
        first = 0 if len(chunks) == len(self.pending) else 1
        for chunk in unified.chunks[first:]:
            self.codes.append(chunk.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False))
        self.pending = []
        self.pending_entries = 0

    def finish(self) -> tuple[np.ndarray, object]:
        """(codes [n] int32, distinct values)."""
        self.merge()
        codes = np.concatenate(self.codes) if self.codes else np.zeros(0, dtype=np.int32)
        self.codes = []
        return codes, self.dictionary


def read_reviews(path: Path, bad: BadRows, threads: int, block_bytes: int) -> Reviews:
    users, items = IdCoder(), IdCoder()
    time_chunks = []
    lines = 0
    for parsed in parallel_blocks(path, block_bytes, threads, parse_review_block):
        for reason, detail, line in parsed.bad:
            bad.bad(reason, detail, path, lines + line)
        users.add(parsed.users)
        items.add(parsed.items)
        time_chunks.append(parsed.times)
        lines += parsed.lines
    if lines == 0:
        raise GdrtError("empty file: no review lines", path=str(path))
    if sum(len(t) for t in time_chunks) == 0:
        raise GdrtError("no usable reviews", path=str(path))
    user_codes, user_ids = users.finish()
    item_codes, asins = items.finish()
    times = np.concatenate(time_chunks)
    del time_chunks
    _release_arrow_memory()
    return Reviews(user_codes, item_codes, times, user_ids, asins, lines)


def _release_arrow_memory() -> None:
    """Hand freed pyarrow buffers back to the system (the allocator keeps them otherwise)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()


def _literal(text: str) -> str:
    """The value of a Python string literal ('...' or "...")."""
    if "\\" not in text:
        return text[1:-1]
    return ast.literal_eval(text)


_LITERAL = r"""('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")"""
_ASIN_RE2 = r"(?:^\{|, )'asin': (?P<v>" + _LITERAL[1:-1] + ")"
_TITLE_RE2 = r"(?:^\{|, )'title': (?P<v>" + _LITERAL[1:-1] + ")"


def _meta_2014_line(line: str) -> tuple[str, object] | str:
    """(asin, title or None) of one metadata line read with `ast.literal_eval`, or the problem."""
    try:
        obj = ast.literal_eval(line.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return "not a Python literal dict (amazon2014 metadata format)"
    if not isinstance(obj, dict) or not isinstance(obj.get("asin"), str):
        return "no 'asin' in the line"
    return obj["asin"], obj.get("title")


def parse_meta_2014_block(block, wanted) -> tuple[int, list[tuple[int, str, object]], list[tuple[str, str, int]]]:
    """(lines, [(line in block, asin, title)] for wanted asins, bad lines) of a block of literal lines.

    The asin and title literals are found by RE2 patterns in pyarrow (no Python per line); only the
    wanted items, and lines the patterns miss, are handled in Python.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    data = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(data == 10)  # [lines]
    offsets = np.zeros(len(ends) + 1, dtype=np.int64)
    offsets[1:] = ends + 1
    out: list[tuple[int, str, object]] = []
    bad: list[tuple[str, str, int]] = []
    try:
        lines = pa.LargeBinaryArray.from_buffers(pa.large_binary(), len(ends), [None, pa.py_buffer(offsets), pa.py_buffer(block)])
        lines = lines.cast(pa.large_string())  # checks UTF-8
    except pa.ArrowInvalid:
        lines = None
    if lines is not None:
        asin_match = pc.extract_regex(lines, _ASIN_RE2)  # null where the pattern does not match
        title_match = pc.extract_regex(lines, _TITLE_RE2)
        asin = pc.if_else(pc.is_valid(asin_match), pc.utf8_slice_codeunits(asin_match.field("v"), 1, -1), None)
        title = pc.if_else(pc.is_valid(title_match), title_match.field("v"), None)
        # Python reads the lines the patterns cannot vouch for: no asin found, an escaped asin, not
        # shaped like {...}, or a 'title' key whose value was not found
        suspect = pc.or_(
            pc.or_(pc.is_null(asin), pc.fill_null(pc.match_substring(asin, "\\"), False)),
            pc.or_(
                pc.invert(pc.and_(pc.starts_with(lines, "{"), pc.match_substring_regex(lines, r"\}\s*$"))),
                pc.and_(pc.is_null(title), pc.match_substring(lines, "'title'")),
            ),
        )
        suspect_rows = suspect.to_numpy(zero_copy_only=False)
        take = pc.and_(pc.fill_null(pc.is_in(asin, value_set=wanted), False), pc.invert(suspect))
        rows = np.flatnonzero(take.to_numpy(zero_copy_only=False))
        for row, a, t in zip(rows.tolist(), asin.take(rows).to_pylist(), title.take(rows).to_pylist(), strict=True):
            out.append((row + 1, a, None if t is None else _literal(t)))
        redo = np.flatnonzero(suspect_rows).tolist()
    else:
        redo = list(range(len(ends)))
    wanted_set = None
    for row in redo:
        raw = bytes(block[offsets[row]:offsets[row + 1]])
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad.append(("non-UTF-8 bytes", f"byte {e.start} of the line is not valid UTF-8", row + 1))
            continue
        parsed = _meta_2014_line(line)
        if isinstance(parsed, str):
            bad.append(("malformed metadata", parsed, row + 1))
            continue
        if wanted_set is None:
            wanted_set = set(wanted.to_pylist())
        if parsed[0] in wanted_set:
            out.append((row + 1, *parsed))
    out.sort(key=lambda r: r[0])
    return len(ends), out, bad


def read_meta_2014(path: Path, wanted, bad: BadRows, threads: int, block_bytes: int) -> dict[str, object]:
    """{asin: raw title (None if the item has none)} for the asins in `wanted` (a pa.StringArray)."""
    titles: dict[str, object] = {}
    seen = 0
    parse = functools.partial(_parse_meta_2014, wanted=wanted)
    for lines, rows, bad_lines in parallel_blocks(path, block_bytes, threads, parse):
        events = [(line, 0, r) for line, *r in rows] + [(line, 1, b) for *b, line in bad_lines]
        for line, kind, item in sorted(events, key=lambda e: e[0]):
            if kind:
                bad.bad(item[0], item[1], path, seen + line)
            else:
                _add_meta(titles, item[0], item[1], path, seen + line, bad)
        seen += lines
    if seen == 0:
        raise GdrtError("empty file: no metadata lines", path=str(path))
    return titles


def _parse_meta_2014(block, wanted):
    return parse_meta_2014_block(block, wanted)


def _add_meta(titles: dict, asin: str, title, path: Path, line: int, bad: BadRows) -> None:
    """Keep the title of a wanted item, unless it is not acceptable text or conflicts with an earlier one."""
    for what, value in (("asin", asin), ("title", title)):
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            bad.bad(problem[0], f"the {what} of item {asin!r} {problem[1]}", path, line)
            return
    old = titles.get(asin)
    if asin in titles and old != title and old is not None and title is not None:
        bad.bad("duplicate item id", f"asin {asin} has two titles: {old!r} and {title!r}", path, line)
        return
    if old is None:
        titles[asin] = title


def read_meta_2018(path: Path, wanted, bad: BadRows, threads: int, block_bytes: int) -> dict[str, object]:
    """{asin: raw title} for the asins in `wanted` (a pa.StringArray), from JSON lines."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted_set: set[str] | None = None

    def parse(block: bytes):
        nonlocal wanted_set
        lines = count_lines(block)
        table = _fast_parse(block, ("asin", "title"), (pa.string(), pa.string()))
        if table is not None and table.column(0).null_count == 0 and table.num_rows == lines:
            rows = np.flatnonzero(pc.is_in(table.column(0), value_set=wanted).to_numpy(zero_copy_only=False))
            picked = table.take(pa.array(rows))
            return lines, (rows + 1).tolist(), picked.column(0).to_pylist(), picked.column(1).to_pylist(), []
        checks = {"asin": _check_id, "title": lambda v: None}  # titles are checked in _add_meta
        rows, bad_lines = _slow_lines(block, ("asin", "title"), ("asin",), checks)
        if wanted_set is None:
            wanted_set = set(wanted.to_pylist())
        rows = [(ln, r) for ln, r in rows if r["asin"] in wanted_set]
        return lines, [ln for ln, _ in rows], [r["asin"] for _, r in rows], [r["title"] for _, r in rows], bad_lines

    titles: dict[str, object] = {}
    seen_lines = 0
    for lines, line_numbers, asins, raw_titles, bad_lines in parallel_blocks(path, block_bytes, threads, parse):
        events = [(line, 0, (a, t)) for line, a, t in zip(line_numbers, asins, raw_titles, strict=True)]
        events += [(line, 1, (reason, detail)) for reason, detail, line in bad_lines]
        for line, kind, item in sorted(events, key=lambda e: e[0]):
            if kind:
                bad.bad(item[0], item[1], path, seen_lines + line)
            else:
                _add_meta(titles, item[0], item[1], path, seen_lines + line, bad)
        seen_lines += lines
    if seen_lines == 0:
        raise GdrtError("empty file: no metadata lines", path=str(path))
    return titles


def clean_titles(raw_titles: list, config) -> list[str | None]:
    """The reference's title rule (present, at least `min_title_chars` long, ' VHS' stripped, spaces
    stripped) plus HTML unescaping; None = the item has no usable title."""
    min_chars, strip_vhs, unescape = config.min_title_chars, config.strip_vhs, config.unescape_titles
    out: list[str | None] = []
    for raw in raw_titles:
        if not isinstance(raw, str) or len(raw) < min_chars:
            out.append(None)
            continue
        title = raw
        if strip_vhs and "VHS" in title[-6:]:
            if title.endswith(" VHS"):
                title = title[:-4]
            elif title.endswith(" [VHS]"):
                title = title[:-6]
        title = title.strip()
        if unescape and "&" in title:
            title = html.unescape(title).strip()
            if text_problem(title) is not None:  # an entity such as &#12; decoded to a control character
                title = None
        out.append(title or None)
    return out


def find_meta(source: Path, explicit: str | None) -> Path:
    """--meta, else meta_<category>.json[.gz] next to reviews_<category>_5.json[.gz] / <category>_5.json.gz."""
    if explicit:
        return Path(explicit)
    name = source.name
    for suffix in (".gz", ".json", ".jsonl"):
        name = name.removesuffix(suffix)
    category = name.removeprefix("reviews_").removesuffix("_5")
    for candidate in (f"meta_{category}.json", f"meta_{category}.json.gz", f"meta_{category}.jsonl"):
        if (source.parent / candidate).is_file():
            return source.parent / candidate
    metas = sorted(p for p in source.parent.glob("meta_*") if p.is_file())
    if len(metas) == 1:
        return metas[0]
    raise GdrtError(
        "cannot find the metadata file next to the reviews", path=str(source),
        hint=f"pass --meta (expected meta_{category}.json[.gz])",
    )


def curate_raw(config, out_dir: Path, bad: BadRows) -> dict:
    """Read, filter, window, split and write; returns the manifest."""
    import pyarrow as pa

    from gdrt_core.config import to_dict
    from gdrt_core.dataset import write_dataset

    timings: dict[str, float] = {}
    clock, cpu_clock = time.perf_counter(), time.process_time()

    def lap(name: str) -> None:
        """Wall and CPU seconds of the step and the peak RSS so far (GB), for the benchmark."""
        nonlocal clock, cpu_clock
        now, cpu_now = time.perf_counter(), time.process_time()
        timings[name] = round(now - clock, 3)
        timings[f"{name}_cpu"] = round(cpu_now - cpu_clock, 3)
        timings[f"{name}_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)
        clock, cpu_clock = now, cpu_now

    source = Path(config.source)
    if not source.is_file():
        raise GdrtError("the raw review file does not exist", path=str(source))
    if config.window_rule not in recipe.WINDOW_RULES:
        raise GdrtError(f"window_rule must be one of {recipe.WINDOW_RULES}, not {config.window_rule!r}", path="config")
    meta_path = find_meta(source, config.meta)
    block_bytes = max(1, config.block_mb) << 20
    reviews = read_reviews(source, bad, config.threads, block_bytes)
    lap("read_reviews")

    asins = reviews.asins.to_pylist()
    if config.format == "amazon2014":
        raw_titles = read_meta_2014(meta_path, reviews.asins, bad, config.threads, block_bytes)
    else:
        raw_titles = read_meta_2018(meta_path, reviews.asins, bad, config.threads, block_bytes)
    item_titles = clean_titles([raw_titles.get(a) for a in asins], config)  # [num_asins]
    titled = np.array([t is not None for t in item_titles], dtype=bool)
    lap("read_meta")

    keep = titled[reviews.item_codes]
    stats = {"review_lines": reviews.lines, "reviews": int(len(reviews.times)), "items_in_reviews": len(asins),
             "items_with_title": int(titled.sum()), "reviews_with_titled_item": int(keep.sum())}
    # move the arrays into `arrays` and filter them in place of the originals, so that at most one
    # copy of each per-review array is alive at a time
    arrays = {"users": reviews.user_codes, "items": reviews.item_codes, "times": reviews.times}
    reviews.user_codes = reviews.item_codes = reviews.times = None
    for name in arrays:
        arrays[name] = arrays[name][keep]
    del keep
    curated = recipe.curate_interactions(
        arrays, num_users=len(reviews.user_ids), num_items=len(asins), k=config.k_core,
        max_history=config.max_history, rule=config.window_rule, valid_fraction=config.valid_fraction,
        test_fraction=config.test_fraction, max_train=config.max_train, seed=config.seed,
    )
    if curated is None:
        raise GdrtError(
            f"no interactions left after dropping untitled items and {config.k_core}-core filtering",
            path=str(source), hint="check the metadata file, or lower k_core",
        )
    parts, sorted_users, sorted_items = curated.parts, curated.sorted_users, curated.sorted_items
    item_of_rank, user_of_rank = curated.item_of_rank, curated.user_of_rank
    windows = curated.windows
    train_end = curated.train_end
    sample = curated.sample
    lap("windows")

    num_items = len(item_of_rank)
    # popularity over the whole train split (before sampling) unless asked for the sample's
    whole_train = sample is not None and config.popularity_from == "train"
    counted = windows.take(np.arange(train_end)) if whole_train else parts["train"]
    popularity_counts = recipe.covered_popularity(sorted_items, counted, num_items + 1)
    del counted
    titles = {i + 1: item_titles[a] for i, a in enumerate(item_of_rank.tolist())}
    popularity = {i: int(popularity_counts[i]) for i in titles}
    user_names = reviews.user_ids.take(pa.array(user_of_rank))  # rank -> reviewerID
    first_example = {"train": 0, "valid": len(parts["train"]), "test": len(parts["train"]) + len(parts["valid"])}
    splits = {
        name: _window_batches(w, sorted_users, sorted_items, first_example[name], user_names)
        for name, w in parts.items()
    }
    stats.update({
        "reviews_after_kcore": int(len(sorted_items)), "users": int(len(user_of_rank)), "items": num_items,
        "windows": len(windows), "train_windows_before_sampling": int(train_end),
    })
    report = {
        "format": config.format, "reviews_file": source.name, "meta_file": meta_path.name,
        "steps": [
            f"drop items without a title (stripped title shorter than {config.min_title_chars} chars)",
            "unescape HTML entities in titles" if config.unescape_titles else "titles kept as in the metadata",
            f"iterative {config.k_core}-core on users and items",
            "item ids 1..N and users in order of first appearance; each user's reviews sorted by time (stable)",
            f"sliding windows, history <= {config.max_history}, rule {config.window_rule!r}",
            f"global temporal split by target time: {1 - config.valid_fraction - config.test_fraction:g} / "
            f"{config.valid_fraction:g} / {config.test_fraction:g}",
            (f"train sampled: {config.max_train} windows, seed {config.seed} (pandas DataFrame.sample)"
             if sample is not None else "train not sampled"),
        ],
        "stats": stats, "bad_rows": bad.report(),
        "popularity": (popularity_note(train_end) if whole_train
                       else popularity_note(len(parts["train"]), sampled=True) if sample is not None
                       else popularity_note()),
    }
    manifest = write_dataset(
        out_dir, titles=titles, splits=splits, domain=config.domain, config=to_dict(config), recipe=report,
        num_pop_groups=config.num_pop_groups, popularity=popularity,
    )
    lap("write")
    manifest["timings_s"] = timings
    return manifest


def _window_batches(windows: recipe.Windows, sorted_users, sorted_items, first_example: int, user_names):
    """Record batches of split rows, BATCH_WINDOWS at a time (the history lists are built per batch)."""
    import pyarrow as pa

    for lo in range(0, len(windows), BATCH_WINDOWS):
        part = windows.take(np.arange(lo, min(lo + BATCH_WINDOWS, len(windows))))
        offsets = recipe.history_offsets(part)
        values = recipe.history_values(sorted_items, part, offsets)
        history = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values, pa.int32()))
        yield pa.RecordBatch.from_arrays(
            [
                pa.array(np.arange(first_example + lo, first_example + lo + len(part)), pa.int64()),
                user_names.take(pa.array(sorted_users[part.target])),
                history,
                pa.array(sorted_items[part.target], pa.int32()),
                pa.array(part.target_time, pa.int64()),
            ],
            names=["example_id", "user_id", "history", "target", "timestamp"],
        )
