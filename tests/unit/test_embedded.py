"""`gdrt init-model`: the embedded tokenizer + random Llama, saved as a standard Hugging Face directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gdrt_core.artifacts import read_manifest, sha256_file
from gdrt_core.embedded import SIZES, SPECIAL_TOKENS, EmbeddedConfig, build_model, run
from gdrt_core.errors import GdrtError

torch = pytest.importorskip("torch")


def _hashes(model_dir) -> dict[str, str]:
    """sha256 of every file but manifest.json (whose `created` field is a timestamp)."""
    return {p.name: sha256_file(p) for p in sorted(model_dir.iterdir()) if p.name != "manifest.json"}


def _batch(tokenizer, dataset, n=4):
    """n real Office windows, right padded: ids and mask [n, seq]."""
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import tokenize_example

    exs = [tokenize_example(tokenizer, render(dataset.domain, list(e.history_titles), e.target_title))
           for e in dataset.examples("train", limit=n)]
    width = max(len(e) for e in exs)
    ids = torch.tensor([e.input_ids + [tokenizer.pad_token_id] * (width - len(e)) for e in exs])
    mask = torch.tensor([e.attention_mask + [0] * (width - len(e)) for e in exs])
    return ids, mask


def test_standard_hf_directory_with_manifest(tiny_model_dir, office_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "manifest.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    manifest = read_manifest(tiny_model_dir, "model")
    assert manifest["config"]["size"] == "tiny" and manifest["config"]["seed"] == 0
    assert manifest["inputs"]["dataset"]["manifest_sha256"] == sha256_file(office_dataset / "manifest.json")
    assert manifest["domain"] == "office" and manifest["base"] is None
    info = manifest["embedded"]
    assert (info["hidden"], info["layers"], info["vocab_size"]) == (64, 2, 2048)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.vocab_size == len(tokenizer) == 2048
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2)
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (0, 1, 2)
    assert tokenizer("Stapler")["input_ids"][0] == tokenizer.bos_token_id  # BOS prepended, like Llama


def test_round_trip_gives_the_same_logits(tiny_model_dir, office_dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gdrt_core.dataset import Dataset

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _batch(tokenizer, Dataset(office_dataset))
    in_memory = build_model(SIZES["tiny"], len(tokenizer), seed=0)
    reloaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = in_memory(input_ids=batch[0], attention_mask=batch[1]).logits  # [4, seq, 2048]
        got = reloaded(input_ids=batch[0], attention_mask=batch[1]).logits  # [4, seq, 2048]
    assert expected.shape == (4, batch[0].shape[1], 2048)
    assert torch.equal(expected, got)


def test_tokenizer_keeps_the_response_boundary_on_every_title(tiny_model_dir, office_dataset):
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_tokenizer
    from gdrt_core.tokenization import check_response_boundary, response_token_ids

    tokenizer = load_tokenizer(tiny_model_dir)
    titles = list(Dataset(office_dataset).titles.values())
    check_response_boundary(tokenizer)
    check_response_boundary(tokenizer, titles)
    for title in titles[:50]:
        ids = response_token_ids(tokenizer, title)
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[:-1]) == f'"{title}"'


def test_template_words_are_whole_tokens(tiny_model_dir):
    """The BPE saw the prompt wording, so the template costs few tokens (not one per byte)."""
    from gdrt_core.models import load_tokenizer
    from gdrt_core.prompts import render

    tokenizer = load_tokenizer(tiny_model_dir)
    for domain in ("office", "games", "cds"):
        prompt = render(domain, []).prompt
        n_tokens = len(tokenizer(prompt)["input_ids"])
        assert n_tokens < len(prompt) / 3, (domain, n_tokens, len(prompt))
    assert "ĠResponse" in tokenizer.get_vocab()


def test_same_seed_identical_files_in_a_fresh_process(tiny_model_dir, office_dataset, tmp_path):
    """The CLI in another process (other hash seeds, parallel BPE training) writes byte-identical files."""
    again = tmp_path / "again"
    env = {**os.environ, "PYTHONHASHSEED": "123", "TOKENIZERS_PARALLELISM": "true"}  # fixture: sequential BPE
    cmd = [sys.executable, "-m", "gdrt_core.cli", "init-model", "--dataset", str(office_dataset),
           "--out", str(again), "--size", "tiny", "--seed", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "init-model tiny" in done.stdout
    assert _hashes(again) == _hashes(tiny_model_dir)


def test_other_seed_changes_only_the_weights(tiny_model_dir, office_dataset, tmp_path):
    other = tmp_path / "seed1"
    run(EmbeddedConfig(dataset=str(office_dataset), out=str(other), size="tiny", seed=1))
    a, b = _hashes(tiny_model_dir), _hashes(other)
    assert a["tokenizer.json"] == b["tokenizer.json"]
    assert a["model.safetensors"] != b["model.safetensors"]


def test_rng_state_of_the_caller_is_untouched():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    build_model(SIZES["tiny"], 600, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_bad_inputs_fail_clearly_and_leave_nothing(office_dataset, tmp_path):
    from gdrt_core.cli import main

    out = tmp_path / "model"
    assert main(["init-model", "--dataset", str(tmp_path / "missing"), "--out", str(out)]) == 2
    assert not out.exists() and os.listdir(tmp_path) == []
    with pytest.raises(GdrtError, match="size='huge' is invalid: must be one of tiny, small"):
        run(EmbeddedConfig(dataset=str(office_dataset), out=str(out), size="huge"))
    assert not out.exists()


def test_small_size_is_the_documented_one():
    small = SIZES["small"]
    assert (small.hidden, small.layers, small.heads, small.kv_heads, small.intermediate, small.vocab) == (
        128, 4, 4, 2, 344, 4096
    )
    doc = Path(__file__).resolve().parents[2] / "docs" / "models.md"
    text = doc.read_text(encoding="utf-8")
    assert "hidden 128" in text and "4 layers" in text


def test_manifest_config_is_the_resolved_config(tiny_model_dir):
    manifest = json.loads((tiny_model_dir / "manifest.json").read_text())
    assert set(manifest["config"]) == {"dataset", "out", "size", "seed", "vocab_size", "prompt_examples"}


def test_history_tokens_cover_each_title(tiny_model_dir, office_dataset):
    """GPT-2 splitting never joins letters or digits with the quotes around a title, but a punctuation run
    may cross it ('(30072)' + '",' gives the token ')",'), and that token is the title's (tokenization.py
    rule 2). So the tokens of history position i decode to title i plus, at most, quotes, a comma, spaces."""
    from gdrt_core.dataset import Dataset
    from gdrt_core.models import load_tokenizer
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import HISTORY, tokenize_example

    tokenizer = load_tokenizer(tiny_model_dir)
    exact = 0
    for e in Dataset(office_dataset).examples("train", limit=40):
        ex = tokenize_example(tokenizer, render("office", list(e.history_titles), e.target_title))
        for pos, title in enumerate(e.history_titles):
            ids = [t for t, r, p in zip(ex.input_ids, ex.role, ex.history_pos, strict=True) if r == HISTORY and p == pos]
            text = tokenizer.decode(ids)
            assert title in text
            assert set(text.replace(title, "", 1)) <= set(' ",'), (title, text)
            exact += text == title
    assert exact > 0
