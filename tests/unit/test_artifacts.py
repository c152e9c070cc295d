"""Artifact directories: atomic creation, manifests, hash checks, permissions."""

import json
import os
import stat

import pytest

from gdrt_core.artifacts import atomic_output_dir, read_manifest, write_json_atomic, write_manifest
from gdrt_core.errors import GdrtError


def _make(out, content="1"):
    with atomic_output_dir(out) as tmp:
        (tmp / "data.txt").write_text(content)
        write_manifest(tmp, "eval", config={"a": 1})
    return out


def test_manifest_round_trip_and_inputs(tmp_path):
    first = _make(tmp_path / "first")
    with atomic_output_dir(tmp_path / "second") as tmp:
        write_manifest(tmp, "report", inputs={"eval": first})
    m = read_manifest(tmp_path / "second", "report")
    assert m["inputs"]["eval"]["path"] == str(first)
    assert m["schema_version"] == 1 and m["kind"] == "report"
    assert read_manifest(first, "eval")["files"]["data.txt"]["rows"] is None


def test_failure_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = _make(tmp_path / "out", "old")
    with pytest.raises(RuntimeError), atomic_output_dir(out) as tmp:
        (tmp / "data.txt").write_text("half")
        raise RuntimeError("crash")
    assert (out / "data.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_modified_file_kind_and_version_are_detected(tmp_path):
    out = _make(tmp_path / "out")
    with pytest.raises(GdrtError, match="expected a dataset artifact"):
        read_manifest(out, "dataset")
    (out / "data.txt").write_text("tampered")
    with pytest.raises(GdrtError, match="does not match its sha256"):
        read_manifest(out, "eval")
    m = json.loads((out / "manifest.json").read_text())
    m["schema_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(GdrtError, match="schema_version 99"):
        read_manifest(out, "eval", verify=False)


def test_artifacts_get_ordinary_permissions(tmp_path):
    """Atomic outputs are created with mkdtemp/mkstemp (0700/0600); the finished ones follow the umask."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "a"
        with atomic_output_dir(out) as tmp:
            write_json_atomic(tmp / "x.json", {})
            write_manifest(tmp, "eval")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "manifest.json").stat().st_mode) == 0o644
