"""The grouping stage: r_t under history removal, quantile groups, id alignment, resume (gdrt_core.grouping)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gdrt_core import grouping
from gdrt_core.artifacts import exclusive
from gdrt_core.dataset import Dataset
from gdrt_core.errors import GdrtError
from gdrt_core.grouping import GroupConfig, assign_groups, example_means, fit_edges, history_removed_requests
from gdrt_core.prompts import render
from gdrt_core.scoring import pad_id_of, target_logprobs
from gdrt_core.tokenization import INSTRUCTION, TARGET, tokenize_example


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")


class TableLM(torch.nn.Module):
    """logits(q) = sum of W[token k] over the keys k that query q attends (+ P[position q]): a causal LM
    whose next-token distribution is set by hand, with or without positional effects."""

    def __init__(self, table: torch.Tensor, positional: torch.Tensor | None = None):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)  # [vocab, vocab]
        self.positional = positional  # [max_pos, vocab] or None

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, **_):
        attends = (attention_mask[:, 0] == 0).float()  # [batch, q, k]
        logits = attends @ self.table[input_ids]  # [batch, q, vocab]
        if self.positional is not None:
            logits = logits + self.positional[position_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def train_tokenizer(texts: list[str], vocab_size: int = 400):
    """A byte-level BPE tokenizer trained here (no downloads), with <pad> and <eos>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="module")
def dataset(office_slice) -> Dataset:
    return Dataset(office_slice)


@pytest.fixture(scope="module")
def tokenizer(dataset):
    texts = [
        render(dataset.domain, list(e.history_titles), e.target_title).text
        for e in dataset.examples("train", 50)
    ]
    return train_tokenizer(texts + list(dataset.titles.values()))


def random_table(vocab: int, seed: int = 0, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------- edges and groups


def test_edges_are_train_quantiles_and_reused_on_valid():
    """Train scores 1..8, G = 4: quantile positions (n-1)q = 1.75, 3.5, 5.25 -> edges 2.75, 4.5, 6.25.
    Train groups: {1,2} -> 0, {3,4} -> 1, {5,6} -> 2, {7,8} -> 3 (two each).
    Valid [0, 2.75, 5, 100] with the same edges -> [0, 1, 2, 3] (a score equal to an edge goes up)."""
    train = np.arange(1, 9, dtype=np.float32)
    edges = fit_edges(train, 4)
    np.testing.assert_allclose(edges, [2.75, 4.5, 6.25])
    assert assign_groups(train, edges).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert assign_groups(np.array([0, 2.75, 5, 100]), edges).tolist() == [0, 1, 2, 3]
    assert assign_groups(train, edges).dtype == np.int8


def test_a_score_within_the_tie_tolerance_below_an_edge_goes_up():
    """Edges [2.75, 4.5, 6.25], tolerance 1e-4 nats: 2.74995 is 5e-5 below the first edge -> group 1 (0 without
    the tolerance); 2.7498 is 2e-4 below it -> group 0 either way; 4.49991 -> 2 (1 without); 6.25 -> 3 either way."""
    edges = np.array([2.75, 4.5, 6.25])
    scores = np.array([2.74995, 2.7498, 4.49991, 6.25])
    assert assign_groups(scores, edges, 1e-4).tolist() == [1, 0, 2, 3]
    assert assign_groups(scores, edges).tolist() == [0, 0, 1, 3]
    for bad in (-1e-4, float("nan"), float("inf")):
        with pytest.raises(GdrtError, match="tolerance must be a finite number >= 0"):
            assign_groups(scores, edges, bad)


def test_a_mass_of_near_equal_scores_at_an_edge_stays_in_one_group():
    """60 scores spread over [-10, -1], 40 over [-0.5, -0.01], and between them 50 copies of one token's score,
    -0.8956240, that differ in the 7th digit (+-3e-7, as batched float32 forward passes give them). Sorted, the
    mass holds positions 60-109 of 150, so the median edge falls in it: without a tolerance the mass is split
    by the noise; with the default 1e-4 nats all 50 go to the upper group, whatever their last digits, and the
    other 100 scores keep their groups (60 in group 0, 40 in group 1)."""
    from gdrt_core.grouping import TIE_TOLERANCE

    rng = np.random.default_rng(0)
    spread = np.concatenate([np.linspace(-10.0, -1.0, 60), np.linspace(-0.5, -0.01, 40)])
    scores = np.concatenate([spread, -0.8956240 + rng.uniform(-3e-7, 3e-7, size=50)]).astype(np.float32)
    edges = fit_edges(scores, 2)
    assert scores[100:].min() < edges[0] < scores[100:].max()  # the edge lies inside the mass
    exact = assign_groups(scores, edges)
    assert 0 < exact[100:].sum() < 50  # split by noise
    tolerant = assign_groups(scores, edges, TIE_TOLERANCE)
    assert tolerant[100:].tolist() == [1] * 50 and tolerant[:100].tolist() == exact[:100].tolist() == [0] * 60 + [1] * 40
    noisier = np.concatenate([spread, -0.8956240 + rng.uniform(-3e-6, 3e-6, size=50)]).astype(np.float32)
    assert assign_groups(noisier, fit_edges(noisier, 2), TIE_TOLERANCE).tolist() == tolerant.tolist()


def _scores_table(example_ids, scores):
    import pyarrow as pa

    return pa.table({"example_id": pa.array(example_ids, pa.int64()), "relevance": pa.array(scores, pa.float32())})


def test_the_stage_bins_with_its_tie_tolerance_and_records_it():
    """The stage's binning (`_bin_splits`) on train scores [-3, -2, -1.00002, -1.00001, -1, 0] (one token per
    example), G = 2: the median edge is the mean of the 3rd and 4th scores, -1.000015. Exactly compared,
    -1.00002 is below it (group 0: sizes 3 / 3); with the default 1e-4 nats the near-equal -1.00002 joins the
    other two in the upper group (sizes 2 / 4). A valid score of -1.00005 goes up too. groups.json records the
    tolerance."""
    from gdrt_core.grouping import _bin_splits

    train = _scores_table(range(6), [-3.0, -2.0, -1.00002, -1.00001, -1.0, 0.0])
    valid = _scores_table([10, 11], [-1.00005, -1.5])
    results = {}
    for tolerance in (1e-4, 0.0):
        config = GroupConfig(dataset="d", reference="r", out="o", num_groups=2, tie_tolerance=tolerance)
        table, summary = _bin_splits(config, {"train": train, "valid": valid})
        results[tolerance] = table.column("group").to_pylist()
        assert summary["tie_tolerance"] == tolerance
        np.testing.assert_allclose(summary["edges"], [-1.000015], rtol=0, atol=1e-6)
    assert results[1e-4] == [0, 0, 1, 1, 1, 1, 1, 0] and results[0.0] == [0, 0, 0, 1, 1, 1, 0, 0]
    assert GroupConfig(dataset="d", reference="r", out="o").tie_tolerance == 1e-4


def test_a_nan_score_is_an_error_naming_the_examples():
    from gdrt_core.grouping import _bin_splits

    train = _scores_table([3, 3, 8], [-1.0, float("nan"), -2.0])
    with pytest.raises(GdrtError, match=r"1 train target token score\(s\) are NaN \(examples \[3\]\)"):
        _bin_splits(GroupConfig(dataset="d", reference="r", out="o"), {"train": train})


def test_group_sizes_balanced_on_train():
    """1001 distinct scores into 4 groups: every group holds 250 or 251 of them."""
    scores = np.random.default_rng(0).normal(size=1001)
    sizes = np.bincount(assign_groups(scores, fit_edges(scores, 4)), minlength=4)
    assert sizes.sum() == 1001 and sizes.min() >= 250 and sizes.max() <= 251


def test_example_means():
    """Example 7 has r = [-1, -3] (mean -2), example 9 has r = [-4] (mean -4)."""
    out = example_means(np.array([7, 7, 9]), np.array([-1.0, -3.0, -4.0]))
    np.testing.assert_allclose(out, [-2.0, -2.0, -4.0])


def test_fit_edges_refuses_empty():
    with pytest.raises(GdrtError):
        fit_edges(np.zeros(0), 4)


# ----------------------------------------------------------------------------------------- r_t


def _drop_vs_mask(model, tokenizer, dataset, examples):
    out = {}
    for removal in ("drop", "mask"):
        requests, targets = history_removed_requests(tokenizer, dataset.domain, examples, removal)
        out[removal] = (target_logprobs(model, requests, pad_token_id=pad_id_of(tokenizer)), targets)
    return out


def test_drop_and_mask_agree_without_positional_effects_and_differ_with(tokenizer, dataset):
    """A bag-of-attended-tokens model has no positional effects. `drop` deletes the history with its
    quotes and separators; `mask` hides only the history-role tokens. Zero the table rows of the tokens whose
    counts differ between the two prompts (the separators), and the two see the same bag of tokens before
    every target token: r_t agree. Adding a positional table makes them differ (under `drop` the targets sit
    at earlier positions)."""
    examples = [e for e in dataset.examples("train", 12) if e.history_titles][:8]
    vocab = len(tokenizer)
    table = random_table(vocab)
    for e in examples:
        full = tokenize_example(tokenizer, render(dataset.domain, list(e.history_titles), e.target_title))
        empty = tokenize_example(tokenizer, render(dataset.domain, [], e.target_title))
        kept = np.bincount(
            [t for t, r in zip(full.input_ids, full.role, strict=True) if r == INSTRUCTION], minlength=vocab
        )
        dropped = np.bincount(
            [t for t, r in zip(empty.input_ids, empty.role, strict=True) if r == INSTRUCTION], minlength=vocab
        )
        table[torch.from_numpy(np.nonzero(kept != dropped)[0])] = 0.0
    same = _drop_vs_mask(TableLM(table), tokenizer, dataset, examples)
    for a, b in zip(same["drop"][0], same["mask"][0], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert same["drop"][1] == same["mask"][1]

    positional = torch.randn(1024, vocab, generator=torch.Generator().manual_seed(3))
    differ = _drop_vs_mask(TableLM(table, positional), tokenizer, dataset, examples)
    gaps = [np.abs(a - b).max() for a, b in zip(differ["drop"][0], differ["mask"][0], strict=True)]
    assert min(gaps) > 1e-3


def test_r_t_is_the_history_free_logprob_hand_checked(tokenizer, dataset):
    """With a table that only scores the EOS row/column, r_t is computable by hand for the last target
    token (EOS): every attended key adds c to the EOS logit, so after k attended keys
    p(EOS) = e^{kc} / (e^{kc} + V - 1); under `drop` the query before EOS attends to all n-1 earlier tokens."""
    (example,) = [e for e in dataset.examples("train", 5) if e.history_titles][:1]
    vocab, c = len(tokenizer), 0.01
    eos = tokenizer.eos_token_id
    table = torch.zeros(vocab, vocab)
    table[:, eos] = c
    requests, targets = history_removed_requests(tokenizer, dataset.domain, [example], "drop")
    (lp,) = target_logprobs(TableLM(table), requests, pad_token_id=pad_id_of(tokenizer))
    k = len(requests[0].input_ids) - 1
    expected = k * c - np.log(np.exp(k * c) + vocab - 1)
    assert targets[0][-1] == eos
    np.testing.assert_allclose(lp[-1], expected, rtol=1e-5)


def test_drop_refuses_targets_that_tokenise_differently(tokenizer, dataset, monkeypatch):
    """If the empty-history prompt changed the target's tokens, the rows could not be joined: clear error."""
    import gdrt_core.prompts as prompts

    real = prompts.render

    def render_changing_target(domain, history, target=None):
        return real(domain, history, target + " x" if target is not None and not history else target)

    monkeypatch.setattr(prompts, "render", render_changing_target)
    examples = [e for e in dataset.examples("train", 5) if e.history_titles]
    with pytest.raises(GdrtError, match="history_removal=mask"):
        history_removed_requests(tokenizer, dataset.domain, examples, "drop")


# ----------------------------------------------------------------------------------------- the stage


def _run(tmp_path, dataset_dir, tokenizer, model, name, **kw):
    cfg = GroupConfig(
        dataset=str(dataset_dir),
        reference="stub",
        out=str(tmp_path / name),
        limit=kw.pop("limit", 40),
        part_size=kw.pop("part_size", 16),
        batch_size=8,
        progress=False,
        **kw,
    )
    summary = grouping.run(cfg, model=model, tokenizer=tokenizer)
    return cfg, summary, pq.read_table(tmp_path / name / "token_groups.parquet")


@pytest.mark.parametrize("removal", ["drop", "mask"])
def test_token_groups_align_with_tokenised_examples(tmp_path, office_slice, dataset, tokenizer, removal):
    """Every (example_id, position) row carries the id of that target token of the FULL tokenised example."""
    model = TableLM(random_table(len(tokenizer), seed=1))
    _, summary, table = _run(
        tmp_path, office_slice, tokenizer, model, f"g-{removal}", history_removal=removal
    )
    rows = table.to_pylist()
    by_example: dict[int, list] = {}
    for r in rows:
        by_example.setdefault(r["example_id"], []).append(r)
    for split in ("train", "valid"):
        for e in dataset.examples(split, 40):
            ex = tokenize_example(tokenizer, render(dataset.domain, list(e.history_titles), e.target_title))
            targets = [t for t, role in zip(ex.input_ids, ex.role, strict=True) if role == TARGET]
            got = sorted(by_example[e.example_id], key=lambda r: r["position"])
            assert [r["position"] for r in got] == list(range(len(targets)))
            assert [r["token_id"] for r in got] == targets
            assert {r["split"] for r in got} == {split}
    assert str(table.schema.field("relevance").type) == "float"
    assert str(table.schema.field("group").type) == "int8"
    train = table.filter(table.column("split").to_numpy(zero_copy_only=False) == "train")
    rel = train.column("relevance").to_numpy()
    np.testing.assert_allclose(summary["edges"], np.quantile(rel.astype(np.float64), [0.25, 0.5, 0.75]))
    assert summary["tie_tolerance"] == 1e-4
    assert train.column("group").to_numpy().tolist() == assign_groups(rel, summary["edges"], 1e-4).tolist()
    assert max(summary["sizes"]["train"]) - min(summary["sizes"]["train"]) <= 0.05 * len(rel) + 1
    assert sum(summary["sizes"]["valid"]) == summary["tokens"]["valid"]


def test_per_example_grouping_gives_one_group_per_example(tmp_path, office_slice, tokenizer):
    model = TableLM(random_table(len(tokenizer), seed=2))
    _, summary, table = _run(tmp_path, office_slice, tokenizer, model, "g-ex", granularity="example")
    group_of: dict[tuple[str, int], set] = {}
    for row in table.select(["split", "example_id", "group"]).to_pylist():
        group_of.setdefault((row["split"], row["example_id"]), set()).add(row["group"])
    assert all(len(gs) == 1 for gs in group_of.values())
    train_groups = [next(iter(gs)) for (split, _), gs in group_of.items() if split == "train"]
    per_group = np.bincount(train_groups, minlength=4)
    assert per_group.sum() == summary["examples"]["train"] and per_group.max() - per_group.min() <= 1


def test_interrupt_and_resume_equals_one_run(tmp_path, office_slice, tokenizer, monkeypatch):
    """Stop after two finished parts; the re-run scores only the remaining parts and writes the same table."""
    model = TableLM(random_table(len(tokenizer), seed=4))
    _, _, one_shot = _run(tmp_path, office_slice, tokenizer, model, "once")

    real = grouping.score_part
    calls = {"n": 0}

    def stop_on_third(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(grouping, "score_part", stop_on_third)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, office_slice, tokenizer, model, "resumed")
    assert not (tmp_path / "resumed").exists()
    assert len(list((tmp_path / "resumed.parts").glob("*.parquet"))) == 2

    calls["n"] = 10  # no more interruptions; count the parts scored by the resumed run
    _, _, resumed = _run(tmp_path, office_slice, tokenizer, model, "resumed")
    parts_total = 2 * 3  # 40 train + 40 valid examples in parts of 16: 3 parts each
    assert calls["n"] - 10 == parts_total - 2
    assert resumed.equals(one_shot)
    assert not (tmp_path / "resumed.parts").exists()


def test_changed_settings_start_the_parts_afresh(tmp_path, office_slice, tokenizer, monkeypatch):
    """Parts left by a run with other settings are not reused."""
    model = TableLM(random_table(len(tokenizer), seed=5))
    work = tmp_path / "g.parts"
    work.mkdir()
    (work / "state.json").write_text('{"history_removal": "mask"}')
    pq.write_table(pq.read_table(office_slice / "items.parquet"), work / "train-00000.parquet")
    _, _, table = _run(tmp_path, office_slice, tokenizer, model, "g", limit=10)
    assert "relevance" in table.column_names and not work.exists()


def test_config_errors(tmp_path, office_slice, tokenizer):
    model = TableLM(random_table(len(tokenizer)))
    with pytest.raises(GdrtError, match="train"):
        _run(tmp_path, office_slice, tokenizer, model, "x", splits=["valid"])
    with pytest.raises(GdrtError, match="history_removal"):
        _run(tmp_path, office_slice, tokenizer, model, "x", history_removal="zero")


def test_a_second_run_on_the_same_output_is_refused(tmp_path, office_slice, tokenizer):
    """Two runs writing the same parts would corrupt each other: the second one stops with a clear error."""
    model = TableLM(random_table(len(tokenizer)))
    with exclusive(tmp_path / "busy.parts", "gdrt group"):
        with pytest.raises(GdrtError, match="another"):
            _run(tmp_path, office_slice, tokenizer, model, "busy", limit=4)
    _run(tmp_path, office_slice, tokenizer, model, "busy", limit=4)  # free again once the first is done
