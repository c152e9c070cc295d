"""Checkpoints that can be trusted: a completion marker with file hashes, written last.

The Trainer writes `checkpoint-<step>/` file by file; a crash can leave it half-written. After every save,
`seal_checkpoint` hashes its files into `gdrt_complete.json` (written atomically, after every rank has
finished writing). On restart `latest_valid_checkpoint` takes the newest checkpoint whose marker exists
and whose files all match; any other checkpoint is moved aside (`corrupt-checkpoint-<step>-<n>`) with a
message saying why, so it is never loaded and never mixed with a later save of the same step.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from gdrt_core.artifacts import follow_umask, sha256_file, write_json_atomic

log = logging.getLogger(__name__)

MARKER = "gdrt_complete.json"
STATE = "gdrt_state.json"  # the weights policy state (lagged losses, EMA)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


# settings that may change between a run and its resume: they do not change what is computed
RESUME_FREE = ("dataset", "model", "groups", "out", "cpu_threads", "log_every", "keep_checkpoints",
               "ndcg_every_epoch", "eval_at_start")


def run_fingerprint(config: dict[str, Any], inputs: dict[str, str | None]) -> dict[str, Any]:
    """What a checkpoint belongs to: the resolved settings (but RESUME_FREE) and the inputs' content."""
    from gdrt_core.artifacts import input_identity

    return {
        "config": {k: v for k, v in config.items() if k not in RESUME_FREE},
        "inputs": {name: input_identity(path) for name, path in inputs.items() if path},
    }


def check_same_run(work_dir: str | os.PathLike, fingerprint: dict[str, Any],
                   defaults: dict[str, Any] | None = None) -> None:
    """Refuse to resume from checkpoints written with other settings or inputs, naming what changed. A setting
    a checkpoint does not record (one added to gdrt after it was written) counts as its value in `defaults`."""
    from gdrt_core.errors import GdrtError

    for step, path in reversed(list_checkpoints(work_dir)):
        try:
            recorded = json.loads((path / MARKER).read_text(encoding="utf-8")).get("run")
        except (OSError, ValueError, AttributeError):
            continue  # an unfinished checkpoint: set aside later, never loaded
        if isinstance(recorded, dict) and isinstance(recorded.get("config"), dict):
            for key, value in (defaults or {}).items():
                if key in fingerprint["config"]:
                    recorded["config"].setdefault(key, json.loads(json.dumps(value)))
        if recorded == json.loads(json.dumps(fingerprint)):
            continue
        if recorded is None:
            changed = ["the checkpoint does not record its settings (written by an older gdrt)"]
        else:
            changed = [
                f"{section} {key}: {recorded[section].get(key)!r} -> {fingerprint[section].get(key)!r}"
                for section in ("config", "inputs")
                for key in sorted(set(recorded.get(section, {})) | set(fingerprint[section]))
                if recorded.get(section, {}).get(key) != json.loads(json.dumps(fingerprint[section].get(key)))
            ]
        raise GdrtError(
            f"checkpoint-{step} was written by a training run with other settings or inputs, so resuming would "
            f"mix two runs ({'; '.join(changed[:6])})", path=str(path),
            hint="re-run with the checkpoint's settings to resume it, or choose another --out (or delete "
                 f"{Path(work_dir)}) to start afresh",
        )


def seal_checkpoint(checkpoint: str | os.PathLike, *, step: int, extra_state: dict[str, Any] | None = None,
                    run: dict[str, Any] | None = None) -> None:
    """Write the policy state, then the marker listing every file of the checkpoint with its sha256 (and the
    run's fingerprint: what a resume must match)."""
    root = Path(checkpoint)
    follow_umask(root)  # the Trainer's savers write the weights 0600
    if extra_state is not None:
        write_json_atomic(root / STATE, extra_state)
    files = {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")
    }
    write_json_atomic(root / MARKER, {"step": step, "files": files, "run": run})


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why the checkpoint cannot be trusted (None if it is complete and intact)."""
    root = Path(checkpoint)
    marker = root / MARKER
    if not marker.is_file():
        return f"no {MARKER} (the save did not finish)"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        files = info["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"{MARKER} is unreadable ({e})"
    if not files:
        return f"{MARKER} lists no files"
    for name, digest in files.items():
        path = root / name
        if not path.is_file():
            return f"file {name} is missing"
        if sha256_file(path) != digest:
            return f"file {name} does not match its sha256 (modified or truncated)"
    return None


def list_checkpoints(work_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = Path(work_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return sorted(found)


def latest_valid_checkpoint(work_dir: str | os.PathLike, *, quarantine: bool = True) -> Path | None:
    """The newest intact checkpoint in `work_dir`; broken ones are reported and moved aside."""
    chosen = None
    for step, path in reversed(list_checkpoints(work_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            if chosen is None:
                chosen = path
            continue
        msg = f"skipping checkpoint {path}: {problem}"
        if quarantine:
            n = 0
            while (target := path.parent / f"corrupt-checkpoint-{step}-{n}").exists():
                n += 1
            os.replace(path, target)
            msg += f"; moved to {target.name}"
        log.warning(msg)
        print(f"gdrt train: {msg}", flush=True)
    return chosen


def remove_unsealed(work_dir: str | os.PathLike) -> None:
    """Delete checkpoints whose save never finished (no marker), e.g. after the disk filled up."""
    import shutil

    for _step, path in list_checkpoints(work_dir):
        if not (path / MARKER).is_file():
            shutil.rmtree(path, ignore_errors=True)


def read_policy_state(checkpoint: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(checkpoint) / STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
