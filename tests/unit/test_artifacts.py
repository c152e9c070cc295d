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


@pytest.mark.parametrize("writer", ["atomic_output_dir", "atomic_file", "exclusive"])
def test_a_failed_write_into_new_directories_removes_them(tmp_path, writer):
    """`--out new/dir/x` that fails leaves no empty `new/dir`; one that succeeds keeps them; directories that
    were there before, or that hold something else, are left alone."""
    import gdrt_core.artifacts as artifacts

    write = getattr(artifacts, writer)
    kwargs = {"command": "t"} if writer == "exclusive" else {}
    (tmp_path / "had").mkdir()
    out = tmp_path / "had" / "new" / "dir" / "x.json"
    with pytest.raises(RuntimeError), write(out, **kwargs):
        raise RuntimeError("crash")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["had"]
    (tmp_path / "had" / "new").mkdir()
    (tmp_path / "had" / "new" / "other").write_text("someone's")
    with pytest.raises(RuntimeError), write(out, **kwargs):
        raise RuntimeError("crash")
    assert sorted(p.name for p in (tmp_path / "had").rglob("*")) == ["new", "other"]
    write_json_atomic(out, {"a": 1})
    assert json.loads(out.read_text()) == {"a": 1}


def test_a_failed_write_of_several_files_removes_every_directory_it_created(tmp_path):
    """atomic_files into two new sibling directories under a new one: all three go, whatever the order."""
    from gdrt_core.artifacts import atomic_files

    with pytest.raises(RuntimeError), atomic_files([tmp_path / "a" / "b" / "f1.txt", tmp_path / "a" / "c" / "f2.txt"]):
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


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


def _owner_only_saver(root):
    """What third-party savers do (safetensors, peft): files 0600, directories 0700."""
    (root / "model.safetensors").write_bytes(b"w")
    os.chmod(root / "model.safetensors", 0o600)
    (root / "sub").mkdir()
    os.chmod(root / "sub", 0o700)
    (root / "sub" / "adapter_model.safetensors").write_bytes(b"a")
    os.chmod(root / "sub" / "adapter_model.safetensors", 0o600)
    (root / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(root / "run.sh", 0o700)


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode", "exec_mode"),
    [(0o022, 0o644, 0o755, 0o755), (0o002, 0o664, 0o775, 0o775), (0o077, 0o600, 0o700, 0o700),
     (0o027, 0o640, 0o750, 0o750)],
)
def test_files_of_third_party_savers_follow_the_umask(tmp_path, umask, file_mode, dir_mode, exec_mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "m"
        with atomic_output_dir(out) as tmp:
            _owner_only_saver(tmp)
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out) == dir_mode and mode(out / "sub") == dir_mode
    assert mode(out / "model.safetensors") == file_mode
    assert mode(out / "sub" / "adapter_model.safetensors") == file_mode
    assert mode(out / "run.sh") == exec_mode


def test_saved_weights_of_full_and_lora_models_follow_the_umask(tmp_path, make_tiny_llama):
    """transformers and peft write safetensors 0600; the finished Model directory is 0644 under umask 022."""
    from gdrt_core.models import apply_lora, save_model

    old = os.umask(0o022)
    try:
        for name, model in (("full", make_tiny_llama(32)), ("lora", apply_lora(make_tiny_llama(32)))):
            with atomic_output_dir(tmp_path / name) as tmp:
                save_model(model, None, tmp, base_ref="base")
    finally:
        os.umask(old)
    for path in (tmp_path / "full" / "model.safetensors", tmp_path / "lora" / "adapter_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_messages_name_the_artifact_kind_with_its_article(tmp_path):
    """Kinds that start with a vowel (eval, attribution) read "an eval artifact", the others "a model"."""
    from gdrt_core.artifacts import check_output

    with atomic_output_dir(tmp_path / "model") as tmp:
        write_manifest(tmp, "model")
    with pytest.raises(GdrtError, match="expected an eval artifact, found kind='model'"):
        read_manifest(tmp_path / "model", "eval")
    (tmp_path / "plain").mkdir()
    with pytest.raises(GdrtError, match=r"not an attribution artifact: .* writes an attribution artifact"):
        read_manifest(tmp_path / "plain", "attribution")
    with pytest.raises(GdrtError, match="holds an eval artifact, not a model"):
        check_output(_make(tmp_path / "eval"), "model")
    with pytest.raises(GdrtError, match="holds a model artifact, not an attribution"):
        check_output(tmp_path / "model", "attribution")


def test_a_failed_write_names_the_output_not_its_temporary_file(tmp_path):
    """A writer's OSError on the temporary file (disk full, here simulated) is re-raised naming the output the
    user asked for; the temporary file is gone and an earlier output is untouched."""
    import errno

    from gdrt_core.artifacts import atomic_file
    from gdrt_core.errors import filesystem_error

    out = tmp_path / "cmp.json"
    out.write_text("earlier")
    with pytest.raises(OSError) as e, atomic_file(out) as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(out)
    assert str(filesystem_error(e.value)) == f"{out}: cannot write: No space left on device (free space, or " \
                                             "choose an output directory you can write to)"
    assert os.listdir(tmp_path) == ["cmp.json"] and out.read_text() == "earlier"
    with pytest.raises(ValueError), atomic_file(out):  # other errors pass unchanged
        raise ValueError("not a file system error")
    with pytest.raises(OSError) as e, atomic_file(out) as tmp:  # a write error naming no file (a full disk)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.filename == str(out)


def test_an_unwritable_output_directory_is_named_not_the_temporary_name_tried(tmp_path, monkeypatch):
    """The temporary file or directory cannot even be made (a read-only or full file system): the error names the
    output; an error on a file inside a stage's temporary directory names that file inside the output."""
    import errno
    import tempfile

    from gdrt_core.artifacts import atomic_file, atomic_output_dir

    def refuse(*args, prefix="", dir=None, **kw):
        raise OSError(errno.EROFS, "Read-only file system", os.path.join(dir, prefix + "xyz"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as e, atomic_file(tmp_path / "x.json"):
        pass
    assert e.value.errno == errno.EROFS and e.value.filename == str(tmp_path / "x.json")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(GdrtError, match=f"{tmp_path / 'ds'}: cannot write: Read-only file system"), \
            atomic_output_dir(tmp_path / "ds"):
        pass
    monkeypatch.undo()
    with pytest.raises(OSError) as e, atomic_output_dir(tmp_path / "ds") as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "items.parquet"))
    assert e.value.filename == str(tmp_path / "ds" / "items.parquet") and os.listdir(tmp_path) == []


def test_atomic_files_are_all_or_nothing(tmp_path):
    """Three files written together, a directory in the way of the third: the first gets its earlier content
    back, the second (new) is removed, and no temporary or backup file is left."""
    from gdrt_core.artifacts import atomic_files

    (tmp_path / "a.txt").write_text("earlier")
    (tmp_path / "c.txt").mkdir()
    with pytest.raises(IsADirectoryError, match="c.txt"), \
            atomic_files([tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"]) as tmps:
        for tmp in tmps:
            tmp.write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == "earlier"
    with atomic_files([tmp_path / "a.txt", tmp_path / "b.txt"]) as tmps:
        for tmp in tmps:
            tmp.write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.txt", "c.txt"]
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text() == "new"
