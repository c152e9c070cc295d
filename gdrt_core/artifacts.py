"""Artifact directories: atomic creation, manifest.json writing and checking.

Every artifact (Dataset, Model, Groups, Eval, Attribution) is a directory with a manifest.json:

    {"kind", "schema_version", "created", "config", "inputs", "files": {name: {"rows", "sha256"}}, ...extra}

A stage writes into a temporary sibling directory and renames it into place only when everything
succeeded, so a crash or a bad input never leaves a half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from gdrt_core.errors import GdrtError, article, filesystem_error

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("dataset", "model", "groups", "eval", "attribution", "report")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _umask_mode(mode: int) -> int:
    """`mode` as the process umask would leave it (mkstemp/mkdtemp use 0600/0700 regardless)."""
    current = os.umask(0)
    os.umask(current)
    return mode & ~current


def follow_umask(root: str | os.PathLike) -> None:
    """Give every file and directory below `root` (and root) the mode the umask allows.

    Third-party savers write some files owner-only (0600: the safetensors weights of transformers and
    peft), while the rest of an artifact follows the umask; another user, container uid or MLflow server
    could then read the config but not the weights. A file gets 0666 (0777 if its owner may execute it),
    a directory 0777, each masked by the umask.
    """
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        full = 0o777 if path.is_dir() or mode & 0o100 else 0o666
        os.chmod(path, _umask_mode(full))


def make_parents(path: str | os.PathLike) -> list[Path]:
    """Create the missing directories above `path` and return the ones this call created, deepest first: a
    write that then fails hands them to `remove_if_empty`, so that a failed `--out new/dir/x` leaves no empty
    `new/`. A directory another process creates meanwhile is not counted as ours. OSError as `mkdir`'s, after
    removing what this call created."""
    missing = []
    parent = Path(path).absolute().parent
    while not parent.is_dir() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):  # outermost first
            try:
                os.mkdir(d)
                created.append(d)
            except FileExistsError:
                if not d.is_dir():
                    raise
    except OSError:
        remove_if_empty(created)
        raise
    return created[::-1]


def remove_if_empty(dirs: Sequence[Path]) -> None:
    """Remove each of `dirs` that is empty, deepest first (the directories failed writes created); a directory
    that is not empty (the output, or someone else's file) or already gone is left as it is."""
    for d in sorted(dirs, key=lambda d: len(Path(d).parts), reverse=True):
        with contextlib.suppress(OSError):
            os.rmdir(d)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path beside `path` (same suffix, for writers that pick the format by it); when
    the block succeeds it replaces `path` in one rename, with the mode the umask allows. On any failure,
    the write's or the rename's (a directory in the way of `path`), the temporary file is removed: no
    half-written `path` and no leftover."""
    with atomic_files([path]) as (tmp,):
        yield tmp


@contextlib.contextmanager
def atomic_files(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """`atomic_file` for files that belong together (the compiled pipelines): yield a temporary path beside
    each; when the block succeeds they replace their paths, all or none. A rename that fails (a directory in
    the way of the second file) undoes the renames before it: each replaced file gets its earlier content back,
    a new one is removed. On any failure every temporary file is removed."""
    paths = [Path(p) for p in paths]
    tmps: list[Path] = []
    created: list[Path] = []
    try:
        for path in paths:
            try:
                created += make_parents(path)
                fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
            except OSError as e:  # a read-only or full directory: name the output, not the temporary name tried
                raise OSError(e.errno, e.strerror or str(e), str(path)) from None
            os.close(fd)
            tmps.append(Path(name))
        yield tmps
        for tmp in tmps:
            os.chmod(tmp, _umask_mode(0o666))
        _replace_all(tmps, paths)
    except BaseException as e:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        remove_if_empty(created)
        if isinstance(e, OSError):
            raise naming_outputs(e, tmps, paths) from None
        raise


def naming_outputs(e: OSError, temps: Sequence[Path], outputs: Sequence[Path]) -> OSError:
    """`e`, raised while writing the temporary files or directories `temps`, naming the outputs they stand for:
    a temporary path (or one inside a temporary directory) becomes its output's, and an error that names no
    file (a full disk) names the output when there is one. The user gave the output's path; the temporary one
    means nothing to them. Other errors are returned unchanged."""
    name = None if e.filename is None else str(e.filename)
    target = str(outputs[0]) if name is None and len(outputs) == 1 else None
    for tmp, out in zip(temps, outputs, strict=False):
        if name == str(tmp):
            target = str(out)
        elif name is not None and name.startswith(str(tmp) + os.sep):
            target = str(out) + name[len(str(tmp)):]
    if target is None:
        return e
    return OSError(e.errno, e.strerror or str(e), target)  # OSError picks the subclass of the errno


def _replace_all(tmps: list[Path], paths: list[Path]) -> None:
    """Rename each of `tmps` onto its path; if one fails, put back what the earlier ones replaced (a copy of
    each earlier file is kept until all succeeded; one file alone needs none) and raise the failure, naming
    the path that was in the way, not the temporary file."""
    undo: list[tuple[Path, Path | None]] = []  # (path, its earlier content's copy, or None: it was new)
    try:
        for i, (tmp, path) in enumerate(zip(tmps, paths, strict=True)):
            earlier = None
            if i < len(paths) - 1 and path.is_file():  # the last rename is never undone
                fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".old{path.suffix}", dir=path.parent)
                os.close(fd)
                earlier = Path(name)
                shutil.copy2(path, earlier)
            undo.append((path, earlier))
            try:
                os.replace(tmp, path)
            except OSError as e:
                undo.pop()
                if earlier is not None:
                    earlier.unlink(missing_ok=True)
                raise type(e)(e.errno, e.strerror, str(path)) from None
    except BaseException:
        for path, earlier in reversed(undo):
            if earlier is None:
                path.unlink(missing_ok=True)
            else:
                os.replace(earlier, path)
        raise
    for _, earlier in undo:
        if earlier is not None:
            earlier.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and an atomic rename (`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def check_not_input(out: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse an output path (file or directory) that is one of the `inputs` ({what: path}; paths that do not
    exist, such as hub ids, are skipped), contains one, or lies inside an input directory."""
    target = Path(out).absolute().resolve()
    hint = "choose another --out"
    for what, given in inputs.items():
        if not given or not Path(given).expanduser().exists():
            continue
        source = Path(given).expanduser().absolute().resolve()
        if source == target:
            raise GdrtError(f"the output is an input (the {what}): writing it would delete it", path=str(out),
                            hint=hint)
        if target in source.parents:
            raise GdrtError(f"the output directory contains an input (the {what}, {given}): replacing it would "
                            "delete it", path=str(out), hint=hint)
        if source in target.parents:
            raise GdrtError(f"the output lies inside an input (the {what}, {given}): writing it would change it",
                            path=str(out), hint=hint)


def check_path_given(value: str | os.PathLike, name: str, expected: str, hint: str | None = None) -> None:
    """Refuse an empty or blank path argument (`name`, e.g. "--out"): Path("") is the current directory, and
    a blank value is usually an unset shell variable. `expected` says what the argument should name."""
    if not str(value).strip():
        raise GdrtError(f"{name} is empty: expected {expected} (an empty path would be the current directory)",
                        hint=hint)


def check_output_file(out: str | os.PathLike, expected: str, inputs: dict[str, str | os.PathLike | None]) -> None:
    """Refuse, before any work, a single-file output (`--out` of a command) that would destroy something when
    the finished file is renamed over it: an input or a path inside one (`check_not_input`), an empty path,
    a directory, something other than a regular file (a device such as /dev/null, a FIFO, a symbolic link:
    the rename would replace it, not write through it), or a path inside a gdrt artifact directory (one
    holding a manifest.json), whose files are checked against their hashes. `expected` names the file
    wanted ("a .json file") in the errors."""
    check_path_given(out, "--out", expected, hint="give the file to write, e.g. --out out.json")
    check_not_input(out, inputs)
    path = Path(out)
    if path.is_dir():
        raise GdrtError(f"--out is a directory, expected {expected}", path=str(out))
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise GdrtError(f"--out exists and is not a regular file (a link, device or pipe): expected {expected}",
                        path=str(out), hint="writing replaces the file in one rename; choose a new path")
    for parent in path.absolute().parents:
        if (parent / MANIFEST).is_file():
            raise GdrtError(f"--out lies inside the artifact directory {parent}: writing there would change it",
                            path=str(out), hint="choose a path outside the artifact")


def check_output(
    out: str | os.PathLike, kind: str, *, inputs: dict[str, str | os.PathLike | None] | None = None,
    keep: tuple[str, ...] = (),
) -> None:
    """Refuse, before any work, an output path whose replacement would destroy something.

    The output must not be one of the `inputs` ({what: path}; paths that do not exist, such as hub ids,
    are skipped), contain one, or lie inside an input directory. An existing output must be an artifact
    of the same `kind` (it is replaced once the new one is complete), an empty directory, or a directory
    holding only the entries named in `keep` (train's checkpoints of an interrupted run). An empty path
    (the current directory) is refused.
    """
    check_path_given(out, "--out", f"the directory to write {article(kind)} artifact to",
                     hint="give --out the directory to write")
    check_not_input(out, inputs or {})
    target = Path(out).absolute().resolve()
    a_kind = article(kind)
    if not (target.exists() or target.is_symlink()):
        return
    hint = (f"gdrt replaces only an earlier {kind} artifact: choose another --out, or move this one away "
            "yourself")
    if not target.is_dir():
        raise GdrtError(f"the output exists and is a file, not {a_kind} artifact directory", path=str(out), hint=hint)
    manifest = target / MANIFEST
    if manifest.is_file():
        try:
            found = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
        except (OSError, ValueError, AttributeError):
            found = None
        if found != kind:
            holds = article(found) if isinstance(found, str) else "an unreadable"
            raise GdrtError(f"the output directory holds {holds}"
                            f" artifact, not {a_kind}: it would be deleted", path=str(out), hint=hint)
        return
    entries = sorted(p.name for p in target.iterdir())
    others = [e for e in entries if e not in keep]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise GdrtError(f"the output directory exists and is not {a_kind} artifact (no {MANIFEST}; it holds "
                        f"{shown}): it would be deleted", path=str(out), hint=hint)


@contextlib.contextmanager
def atomic_output_dir(
    out: str | os.PathLike, *, overwrite: bool = True, kind: str | None = None,
    inputs: dict[str, str | os.PathLike | None] | None = None, keep: tuple[str, ...] = (),
) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is replaced only after the new one is complete (overwrite=True), or refused. With
    `kind`, `check_output` runs first: an input, or a directory that is not a `kind` artifact, is never
    replaced (stages also call it before their work). Every file in it gets the mode the umask allows
    (`follow_umask`), whoever wrote it.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise GdrtError("output directory already exists", path=str(out), hint="choose another --out or remove it")
    if kind is not None:
        check_output(out, kind, inputs=inputs, keep=keep)
    created: list[Path] = []
    try:
        created = make_parents(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        remove_if_empty(created)
        raise filesystem_error(OSError(e.errno, e.strerror or str(e), str(out)), out) from None
    os.chmod(tmp, _umask_mode(0o777))  # readable by other users (e.g. other containers' stages) as usual
    try:
        yield tmp
        follow_umask(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
        if isinstance(e, OSError):
            raise naming_outputs(e, [tmp], [out]) from None
        raise


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold a lock next to `path` (`.<name>.lock`) while a stage writes it: two runs on the same output
    would pick up and overwrite each other's work (parts, checkpoints). A second run is a GdrtError."""
    path = Path(path).absolute()
    lock_path = path.parent / f".{path.name}.lock"
    created = make_parents(lock_path)
    try:
        with _locked(lock_path, path, command):
            yield
    finally:
        remove_if_empty(created)  # after a failure; a finished output keeps its directory non-empty


@contextlib.contextmanager
def _locked(lock_path: Path, path: Path, command: str) -> Iterator[None]:
    with open(lock_path, "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GdrtError(f"another `{command}` is writing this output right now", path=str(path),
                            hint="wait for it to finish, or choose another --out") from None
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _rows(path: Path) -> int | None:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    return None


def describe_files(root: str | os.PathLike, names: list[str] | None = None) -> dict[str, dict]:
    """{relative name: {"rows", "sha256"}} for `names` (default: every file below root but the manifest)."""
    root = Path(root)
    if names is None:
        names = sorted(
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST
        )
    return {n: {"rows": _rows(root / n), "sha256": sha256_file(root / n)} for n in names}


def manifest_hash(artifact_dir: str | os.PathLike) -> str:
    return sha256_file(Path(artifact_dir) / MANIFEST)


def input_identity(source: str | os.PathLike) -> dict:
    """What identifies an input's content, cheaply: an artifact's manifest hash (its manifest lists every
    file's sha256); for another local directory, its weight files' names, sizes and times; else the name
    (a hub id). Used to tell whether resumable work (parts, checkpoints) was made from the same inputs."""
    path = Path(source).expanduser()
    if (path / MANIFEST).is_file():
        return {"manifest_sha256": manifest_hash(path)}
    if path.is_dir():
        return {"weights": sorted([p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in path.glob("*.safetensors"))}
    return {"name": str(source)}


def write_manifest(
    root: str | os.PathLike,
    kind: str,
    *,
    config: dict | None = None,
    inputs: dict[str, str | os.PathLike] | None = None,
    files: list[str] | None = None,
    **extra: Any,
) -> dict:
    """Describe the artifact in `root` (its files, config, and the manifests of its inputs)."""
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; expected one of {KINDS}")
    manifest = {
        "kind": kind,
        "schema_version": SCHEMA_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "config": config or {},
        "inputs": {
            name: {"path": str(Path(p).absolute()), "manifest_sha256": manifest_hash(p)}
            for name, p in (inputs or {}).items()
        },
        "files": describe_files(root, files),
        **extra,
    }
    write_json_atomic(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | os.PathLike, kind: str, *, verify: bool = True) -> dict:
    """Load and check an artifact's manifest: kind, schema version, file hashes."""
    root = Path(root)
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise GdrtError(f"a file, not {article(kind)} artifact directory", path=str(root),
                        hint=f"give the directory the gdrt stage that writes {article(kind)} artifact made")
    if not root.is_dir():
        raise GdrtError(f"{kind} artifact directory does not exist", path=str(root))
    if not path.is_file():
        raise GdrtError(
            f"not {article(kind)} artifact: manifest.json is missing", path=str(root),
            hint=f"create it with the gdrt stage that writes {article(kind)} artifact",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise GdrtError(f"manifest is not valid JSON ({e})", path=str(path)) from None
    if not isinstance(manifest, dict):
        raise GdrtError(f"manifest is JSON but not an object ({type(manifest).__name__})", path=str(path))
    if manifest.get("kind") != kind:
        raise GdrtError(f"expected {article(kind)} artifact, found kind={manifest.get('kind')!r}", path=str(path))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise GdrtError(
            f"schema_version {manifest.get('schema_version')} is not supported (expected {SCHEMA_VERSION})",
            path=str(path), hint="re-create the artifact with this version of gdrt",
        )
    if verify:
        verify_files(root, manifest)
    return manifest


def _same_kind(actual: Any, expected: Any) -> bool:
    """Whether a parquet column of type `actual` holds values of `expected`'s kind: integers for an integer type
    (any width; a value that does not fit is refused by the cast), floating point for a float type, text for a
    string type. Never text for numbers or numbers for text, as a permissive cast would allow."""
    import pyarrow as pa

    if pa.types.is_dictionary(actual):  # a dictionary-encoded column holds its value type
        actual = actual.value_type
    for kind in (pa.types.is_integer, pa.types.is_floating):
        if kind(expected):
            return kind(actual)
    if pa.types.is_string(expected) or pa.types.is_large_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual == expected


def read_table(path: str | os.PathLike, columns: dict) -> Any:
    """The `columns` ({name: pyarrow type}) of the parquet file `path` of an artifact, as a pyarrow Table of
    exactly those columns and types. A GdrtError naming the file when it is not parquet, lacks a column or has
    it twice, holds a column of another kind (text where numbers belong; `_same_kind`) or a value that does
    not fit the type, or a null (a file edited or written by something else)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    remake = "re-create the artifact with the gdrt stage that writes it"
    expected = "expected " + ", ".join(f"{c} {t}" for c, t in columns.items())
    try:
        schema = pq.read_schema(path)
        missing = [c for c in columns if c not in schema.names]
        twice = [c for c in columns if schema.names.count(c) > 1]
        wrong = [f"{c} is {schema.field(c).type}" for c in columns
                 if c not in missing and c not in twice and not _same_kind(schema.field(c).type, columns[c])]
        for problem, names in (("has no column", missing), ("has more than one column named", twice),
                               ("has a column of another type:", wrong)):
            if names:
                raise GdrtError(f"{problem} {', '.join(names)}", path=str(path), hint=f"{expected}; {remake}")
        table = pq.read_table(path, columns=list(columns)).cast(pa.schema(list(columns.items())))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GdrtError(f"not a parquet file of the expected columns ({first})", path=str(path),
                        hint=f"{expected}; {remake}") from None
    except OSError as e:  # missing, a directory, unreadable
        raise GdrtError(f"cannot be read as a parquet file ({e.strerror or e})", path=str(path),
                        hint=remake) from None
    empty = [c for c in columns if table.column(c).null_count]
    if empty:
        raise GdrtError(f"column {', '.join(empty)} has empty (null) values", path=str(path),
                        hint=remake)
    return table


def verify_files(root: str | os.PathLike, manifest: dict | None = None) -> None:
    """Every file the manifest lists exists and matches its sha256 (a GdrtError naming the file otherwise)."""
    root = Path(root)
    if manifest is None:
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise GdrtError(f"the manifest cannot be read ({e})", path=str(root / MANIFEST)) from None
    for name, info in manifest.get("files", {}).items():
        f = root / name
        if not f.is_file():
            raise GdrtError(f"file {name!r} listed in the manifest is missing", path=str(root))
        if sha256_file(f) != info.get("sha256"):
            raise GdrtError(
                f"file {name!r} does not match its sha256 in the manifest (modified or corrupt)",
                path=str(root), hint="re-create the artifact",
            )


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why a .safetensors file cannot be loaded (truncated, not safetensors), read from its header alone;
    None when its size matches what the header describes."""
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"truncated or empty ({size} bytes)"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return f"truncated: its header says {length} header bytes, the file has {size}"
        try:
            header = json.loads(f.read(length))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (unreadable header)"
    if 8 + length + end != size:
        return f"truncated or corrupt: the header describes {8 + length + end} bytes, the file has {size}"
    return None
