"""A prompt longer than the model's context is refused, in every stage that tokenises for a model, with an
error naming the example, its length and the limit; never an IndexError from the position embeddings."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import render
from gdrt_core.tokenization import context_limit, tokenize_example, tokenize_prompt


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")


def _cfg(**kw):
    return SimpleNamespace(config=SimpleNamespace(**kw))


@pytest.mark.parametrize(
    ("model", "tokenizer_max", "expected"),
    [
        (_cfg(max_position_embeddings=64), 2048, 64),  # Llama-style
        (_cfg(n_positions=256), 2048, 256),  # GPT-2 (learned positions)
        (_cfg(n_positions=1024), 512, 512),  # the tokenizer states a smaller limit
        (_cfg(max_position_embeddings=4096), int(1e30), 4096),  # transformers' "no limit" sentinel
        (_cfg(hidden_size=8), int(1e30), None),  # nothing stated
        (None, 300, 300),
    ],
)
def test_context_limit(model, tokenizer_max, expected):
    assert context_limit(model, SimpleNamespace(model_max_length=tokenizer_max)) == expected


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from gdrt_core.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def test_example_and_prompt_over_the_limit_are_named(tokenizer):
    rendered = render("office", ["Desk Lamp", "Stapler"], "Pens")
    n = len(tokenize_example(tokenizer, rendered))
    assert len(tokenize_example(tokenizer, rendered, max_length=n)) == n  # exactly at the limit fits
    with pytest.raises(GdrtError, match=rf"example 7 is longer than the model's context: {n} tokens > {n - 1}"):
        tokenize_example(tokenizer, rendered, max_length=n - 1, name="example 7")
    p = len(tokenize_prompt(tokenizer, rendered))
    tokenize_prompt(tokenizer, rendered, max_length=p + 5, reserve=5)
    with pytest.raises(GdrtError, match=rf"{p} prompt tokens \+ up to 6 generated .* = {p + 6} > {p + 5}"):
        tokenize_prompt(tokenizer, rendered, max_length=p + 5, reserve=6, name="history 0")


def _gpt2_with_tokenizer(out, tokenizer_dir, n_positions: int):
    """A tiny GPT-2 (learned positions) with the tiny model's tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from gdrt_core.models import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=n_positions, n_embd=16, n_layer=1, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    GPT2LMHeadModel(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory, tiny_model_dir):
    """n_positions 128: every Office example (~350 tokens) is longer than the context."""
    return _gpt2_with_tokenizer(tmp_path_factory.mktemp("gpt2") / "gpt2-128", tiny_model_dir, 128)


CONTEXT_ERROR = r"example \d+ of the (train|test) split is longer than the model's context: .* > 128 tokens"


def test_evaluate_refuses(tmp_path, office_slice, short_gpt2):
    from gdrt_core.evaluate import EvalConfig, run

    with pytest.raises(GdrtError, match=CONTEXT_ERROR):
        run(EvalConfig(dataset=str(office_slice), model=str(short_gpt2), out=str(tmp_path / "ev"), limit=4,
                       device="cpu", progress=False, plots=False))
    assert list(tmp_path.iterdir()) == []


def test_train_refuses(tmp_path, office_slice, short_gpt2):
    from gdrt_core.train import TrainConfig, run

    with pytest.raises(GdrtError, match=CONTEXT_ERROR):
        run(TrainConfig(dataset=str(office_slice), model=str(short_gpt2), out=str(tmp_path / "m"), max_steps=1,
                        lora_target_modules=["c_attn"],
                        batch_size=2, valid_size=2, eval_at_start=False, ndcg_every_epoch=False, save_every=0,
                        eval_every=0, cpu_threads=1))
    assert not (tmp_path / "m").exists()


def test_attribute_refuses(tmp_path, office_slice, short_gpt2):
    from gdrt_core.attribution import AttributeConfig, run

    with pytest.raises(GdrtError, match=CONTEXT_ERROR):
        run(AttributeConfig(dataset=str(office_slice), model=str(short_gpt2), out=str(tmp_path / "a"), limit=2,
                            device="cpu", progress=False))
    assert list(tmp_path.iterdir()) == []


def test_group_refuses(tmp_path, office_slice, short_gpt2):
    from gdrt_core.grouping import GroupConfig, run

    with pytest.raises(GdrtError, match=r"example \d+ is longer than the model's context: .* > 128 tokens"):
        run(GroupConfig(dataset=str(office_slice), reference=str(short_gpt2), out=str(tmp_path / "g"), limit=2,
                        device="cpu", progress=False))
    assert not (tmp_path / "g").exists()


def test_recommend_refuses(tmp_path, office_slice, tiny_model_dir):
    """n_positions 300: one title of history + the longest catalogue title (157 tokens) fit, ten do not."""
    from gdrt_core.dataset import Dataset
    from gdrt_core.recommend import Recommender

    model_dir = _gpt2_with_tokenizer(tmp_path / "gpt2-300", tiny_model_dir, 300)
    rec = Recommender.load(model_dir, items=office_slice / "items.parquet", domain="office", device="cpu")
    titles = list(Dataset(office_slice).titles.values())
    assert len(rec.recommend([titles[:1]], k=2)[0].titles) == 2
    with pytest.raises(GdrtError, match=r"history 1 is longer than the model's context: .* > 300 tokens"):
        rec.recommend([titles[:1], titles[:10]], k=2)
