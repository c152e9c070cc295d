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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gdrt_core.errors import GdrtError

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


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to `path` via a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is replaced only after the new one is complete (overwrite=True), or refused. Every
    file in it gets the mode the umask allows (`follow_umask`), whoever wrote it.
    """
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise GdrtError("output directory already exists", path=str(out), hint="choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    if not root.is_dir():
        raise GdrtError(f"{kind} artifact directory does not exist", path=str(root))
    if not path.is_file():
        raise GdrtError(
            f"not a {kind} artifact: manifest.json is missing", path=str(root),
            hint=f"create it with the gdrt stage that writes a {kind}",
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GdrtError(f"manifest is not valid JSON ({e})", path=str(path)) from None
    if manifest.get("kind") != kind:
        raise GdrtError(f"expected a {kind} artifact, found kind={manifest.get('kind')!r}", path=str(path))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise GdrtError(
            f"schema_version {manifest.get('schema_version')} is not supported (expected {SCHEMA_VERSION})",
            path=str(path), hint="re-create the artifact with this version of gdrt",
        )
    if verify:
        for name, info in manifest.get("files", {}).items():
            f = root / name
            if not f.is_file():
                raise GdrtError(f"file {name!r} listed in the manifest is missing", path=str(root))
            if sha256_file(f) != info.get("sha256"):
                raise GdrtError(
                    f"file {name!r} does not match its sha256 in the manifest (modified or corrupt)",
                    path=str(root), hint="re-create the artifact",
                )
    return manifest
