"""Feature-ablation and gradient x input attribution (gdrt_core.attribution), checked against hand values."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from gdrt_core import attribution
from gdrt_core.attribution import (
    AttributeConfig,
    ablation_attributions,
    counterfactual_summary,
    grad_x_input_attributions,
    neutral_token_id,
    segment_indices,
    summarize,
)
from gdrt_core.errors import GdrtError
from gdrt_core.tokenization import HISTORY, INSTRUCTION, TARGET, TokenizedExample

LN2, LN3 = math.log(2), math.log(3)
INS, HIS, TGT = INSTRUCTION, HISTORY, TARGET


@pytest.fixture(autouse=True)
def _no_tracking(monkeypatch):
    monkeypatch.setenv("GDRT_TRACKING", "off")


class TableLM(torch.nn.Module):
    """logits(q) = sum of W[token k] over the keys k that query q attends: hand-set next-token table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table.float(), requires_grad=False)  # [vocab, vocab]

    def forward(self, input_ids, attention_mask, position_ids, logits_to_keep=0, **_):
        attends = (attention_mask[:, 0] == 0).float()  # [batch, q, k]
        logits = attends @ self.table[input_ids]  # [batch, q, vocab]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def hand_example() -> TokenizedExample:
    """Tokens 0 = neutral, 1 = instruction word, 2 = history item 0, 3 = history item 1, 4 = target word.
    Sequence [1, 2, 3, 1, 4, 4] with roles [I, H0, H1, I, T, T]."""
    ids = [1, 2, 3, 1, 4, 4]
    return TokenizedExample(
        input_ids=ids,
        attention_mask=[1] * 6,
        labels=[-100, -100, -100, -100, 4, 4],
        role=[INS, HIS, HIS, INS, TGT, TGT],
        history_pos=[-1, 0, 1, -1, -1, -1],
    )


def hand_model() -> TableLM:
    """Only the logit of token 4 moves: x = sum over attended keys of w[token], w = [0, ln2, ln2, ln3, ln2],
    so p(4) = e^x / (e^x + 4)."""
    table = torch.zeros(5, 5)
    table[:, 4] = torch.tensor([0.0, LN2, LN2, LN3, LN2])
    return TableLM(table)


def lg(x: float) -> float:
    return math.log(x)


def test_ablation_deltas_neutral_baseline_hand_computed():
    """Full: y0 is predicted at query 3 from {1, 2, 3, 1}: x = 2ln2 + ln2 + ln3 = ln24, p = 24/28 = 6/7;
    y1 at query 4 also sees the first 4: x = ln48, p = 48/52 = 12/13.
    Neutral token 0 adds nothing, so an ablated segment just drops its terms:
      instruction (idx 0, 3): x = ln6, ln12 -> p = 6/10 = 3/5, 12/16 = 3/4
      history (idx 1, 2):     x = ln4, ln8  -> p = 4/8 = 1/2, 8/12 = 2/3
      item 0 (idx 1):         x = ln12, ln24 -> p = 3/4, 6/7
      item 1 (idx 2):         x = ln8, ln16  -> p = 2/3, 4/5
      prefix (idx 4 -> 0):    y0 unchanged 6/7; y1 loses ln2: x = ln24 -> 6/7
    Δ = log p_full - log p_ablated."""
    (a,) = ablation_attributions(
        hand_model(), [hand_example()], [7], baseline="neutral", neutral_id=0, pad_token_id=0
    )
    assert a.example_id == 7
    np.testing.assert_allclose(a.logprobs, [lg(6 / 7), lg(12 / 13)], rtol=1e-5)
    np.testing.assert_allclose(a.instruction, [lg(6 / 7) - lg(3 / 5), lg(12 / 13) - lg(3 / 4)], rtol=1e-5)
    np.testing.assert_allclose(a.history, [lg(6 / 7) - lg(1 / 2), lg(12 / 13) - lg(2 / 3)], rtol=1e-5)
    np.testing.assert_allclose(a.items[0], [lg(6 / 7) - lg(3 / 4), lg(12 / 13) - lg(6 / 7)], rtol=1e-5)
    np.testing.assert_allclose(a.items[1], [lg(6 / 7) - lg(2 / 3), lg(12 / 13) - lg(4 / 5)], rtol=1e-5)
    np.testing.assert_allclose(a.prefix, [0.0, lg(12 / 13) - lg(6 / 7)], atol=1e-6)


def test_ablation_deltas_attention_baseline_hand_computed():
    """Hidden keys drop out, but every query still sees itself. Query 3 (predicting y0) is the instruction
    token at idx 3: with the instruction hidden it keeps its own ln2: x = ln2 + ln2 + ln3 = ln12, p = 3/4
    (the neutral baseline gave 3/5). Query 4 (y1) is a target token: sees {2, 3, 4}: x = ln12, p = 3/4.
    History hiding equals the neutral numbers (queries 3, 4 are not history): p = 1/2, 2/3.
    Prefix: idx 4 becomes neutral and hidden; query 4 sees its neutral self: p(y1) = 6/7 as before."""
    (a,) = ablation_attributions(
        hand_model(), [hand_example()], [7], baseline="attention", neutral_id=0, pad_token_id=0
    )
    np.testing.assert_allclose(a.instruction, [lg(6 / 7) - lg(3 / 4), lg(12 / 13) - lg(3 / 4)], rtol=1e-5)
    np.testing.assert_allclose(a.history, [lg(6 / 7) - lg(1 / 2), lg(12 / 13) - lg(2 / 3)], rtol=1e-5)
    np.testing.assert_allclose(a.prefix, [0.0, lg(12 / 13) - lg(6 / 7)], atol=1e-6)


def test_segments_keep_bos_and_split_items():
    ex = hand_example()
    assert segment_indices(ex) == {
        "instruction": [0, 3],
        "history": [1, 2],
        "items": [[1], [2]],
        "prefix": [4],
    }
    assert segment_indices(ex, bos_token_id=1)["instruction"] == [3]


def test_rows_and_summary_from_hand_deltas():
    """Token-level aux share = (sum|Δ instr| + sum|Δ prefix|) / (that + sum|Δ hist|) over target tokens,
    with the neutral-baseline hand values of the test above (instr = [ln(10/7), ln(16/13)],
    hist = [ln(12/7), ln(18/13)], prefix = [0, ln(14/13)]); the recency profile puts item 1 (the last) at 1."""
    (a,) = ablation_attributions(
        hand_model(), [hand_example()], [7], baseline="neutral", neutral_id=0, pad_token_id=0
    )
    instr = [lg(6 / 7) - lg(3 / 5), lg(12 / 13) - lg(3 / 4)]
    hist = [lg(6 / 7) - lg(1 / 2), lg(12 / 13) - lg(2 / 3)]
    prefix = [0.0, lg(12 / 13) - lg(6 / 7)]
    aux = sum(map(abs, instr)) + sum(map(abs, prefix))
    s = summarize([a])
    assert s["aux_share"] == pytest.approx(aux / (aux + sum(map(abs, hist))), rel=1e-5)
    assert s["aux_interaction_ratio"] == pytest.approx(aux / sum(map(abs, hist)), rel=1e-5)
    assert s["aux_share_sequence"] == pytest.approx(
        abs(sum(instr)) / (abs(sum(instr)) + abs(sum(hist))), rel=1e-5
    )
    assert s["profile_by_recency"]["1"] == pytest.approx(
        lg(6 / 7) - lg(2 / 3) + lg(12 / 13) - lg(4 / 5), rel=1e-5
    )
    assert s["profile_by_position"]["0"] == pytest.approx(
        lg(6 / 7) - lg(3 / 4) + lg(12 / 13) - lg(6 / 7), rel=1e-5
    )
    assert s["profile_by_target_position"]["1"] == pytest.approx(
        {"instruction": instr[1], "prefix": prefix[1], "history": hist[1], "count": 1}, rel=1e-5
    )
    rows = {(seg, pos): score for seg, pos, score in a.rows()}
    assert rows[("history", -1)] == pytest.approx(sum(hist), rel=1e-5)
    assert rows[("prefix_token", 1)] == pytest.approx(prefix[1], rel=1e-5)
    assert rows[("target_logprob", 0)] == pytest.approx(lg(6 / 7), rel=1e-5)
    assert sum(1 for seg, _ in rows if seg == "history_item") == 2


def test_counterfactual_summary_hand_computed():
    """full: log-probs [-1, -2], ranks [0, 2] -> mean -1.5, mean rank 1, hr@1 1/2, mrr (1 + 1/3)/2 = 2/3.
    removed: [-3, -2], ranks [1, 3] -> -2.5, rank 2, hr@1 0, mrr (1/2 + 1/4)/2 = 3/8.
    Drops: log-prob 1.0, rank +1, hr@1 1/2, mrr 2/3 - 3/8 = 7/24."""
    out = counterfactual_summary(
        {
            "full": [(-1.0, 0), (-2.0, 2)],
            "history_removed": [(-3.0, 1), (-2.0, 3)],
            "history_shuffled": [(-1.0, 0), (-2.0, 2)],
        }
    )
    assert out["metrics"]["full"] == pytest.approx(
        {"mean_target_logprob": -1.5, "mean_rank": 1.0, "hr@1": 0.5, "mrr": 2 / 3}
    )
    assert out["drop"]["history_removed"] == pytest.approx(
        {"mean_target_logprob": 1.0, "mean_rank": 1.0, "hr@1": 0.5, "mrr": 7 / 24}
    )
    assert out["drop"]["history_shuffled"] == pytest.approx(
        {"mean_target_logprob": 0.0, "mean_rank": 0.0, "hr@1": 0.0, "mrr": 0.0}
    )


@pytest.fixture(scope="module")
def tiny_llama(make_tiny_llama):
    return make_tiny_llama(16)


def test_grad_x_input_on_a_tiny_llama(tiny_llama):
    """One forward + backward: target log-probs equal the ablation's unablated pass; the history segment is
    the sum of its items; a padded batch gives the same numbers as one example alone."""
    ex = hand_example()
    longer = TokenizedExample(
        input_ids=[5, 1, 2, 2, 3, 3, 1, 4, 6, 4],
        attention_mask=[1] * 10,
        labels=[-100] * 7 + [4, 6, 4],
        role=[INS, INS, HIS, HIS, HIS, HIS, INS, TGT, TGT, TGT],
        history_pos=[-1, -1, 0, 0, 1, 1, -1, -1, -1, -1],
    )
    together = grad_x_input_attributions(tiny_llama, [ex, longer], [1, 2], pad_token_id=0, batch_size=2)
    alone = grad_x_input_attributions(tiny_llama, [ex], [1], pad_token_id=0)
    (abl,) = ablation_attributions(tiny_llama, [ex], [1], baseline="neutral", neutral_id=0, pad_token_id=0)
    np.testing.assert_allclose(together[0].logprobs, abl.logprobs, rtol=1e-4)
    for name in ("instruction", "history", "prefix"):
        np.testing.assert_allclose(getattr(together[0], name), getattr(alone[0], name), rtol=1e-3, atol=1e-5)
    g = together[1]
    assert g.history[0] == pytest.approx(sum(item[0] for item in g.items), rel=1e-4, abs=1e-6)
    assert np.isfinite(g.instruction).all() and g.instruction[1:].tolist() == [0.0, 0.0]


def test_neutral_token_choice():
    tok = SimpleNamespace(
        pad_token_id=3,
        eos_token_id=2,
        get_vocab=lambda: {"<unk>": 9, "a": 4},
    )
    assert neutral_token_id(tok) == 3
    assert neutral_token_id(tok, "<unk>") == 9

    class Tok:
        pad_token_id, eos_token_id = 3, 2

        def get_vocab(self):
            return {}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2]}

    with pytest.raises(GdrtError, match="neutral_token"):
        neutral_token_id(Tok(), "two tokens")


# ----------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def tokenizer(office_slice):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from gdrt_core.dataset import Dataset
    from gdrt_core.prompts import render

    ds = Dataset(office_slice)
    texts = [render(ds.domain, list(e.history_titles), e.target_title).text for e in ds.examples("train", 50)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts + list(ds.titles.values()), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def test_stage_writes_artifact_consistent_with_summary(tmp_path, office_slice, tokenizer):
    model = TableLM(
        0.3 * torch.randn(len(tokenizer), len(tokenizer), generator=torch.Generator().manual_seed(0))
    )
    cfg = AttributeConfig(
        dataset=str(office_slice),
        model="stub",
        out=str(tmp_path / "attr"),
        limit=6,
        num_negatives=3,
        batch_size=8,
        progress=False,
    )
    summary = attribution.run(cfg, model=model, tokenizer=tokenizer)
    out = tmp_path / "attr"
    table = pq.read_table(out / "attributions.parquet").to_pylist()
    assert {r["segment"] for r in table} >= {
        "instruction",
        "history",
        "history_item",
        "prefix_token",
        "target_logprob",
    }
    assert len({r["example_id"] for r in table}) == 6 == summary["n_examples"]
    hist = sum(abs(r["score"]) for r in table if r["segment"] == "history_token")
    aux = sum(abs(r["score"]) for r in table if r["segment"] in ("instruction_token", "prefix_token"))
    assert summary["aux_share"] == pytest.approx(aux / (aux + hist), rel=1e-4)
    assert (
        json.loads((out / "summary.json").read_text())["counterfactual"]["metrics"]["full"]["mean_rank"] <= 3
    )
    assert {p.name for p in (out / "plots").iterdir()} == {"share_by_segment.png", "profile_by_position.png"}
    assert (out / "manifest.json").is_file()


def test_a_model_that_ignores_everything_has_zero_deltas(tmp_path, office_slice, tokenizer):
    """A zero table gives the uniform distribution everywhere: every Δ and every counterfactual drop is 0."""
    model = TableLM(torch.zeros(len(tokenizer), len(tokenizer)))
    cfg = AttributeConfig(
        dataset=str(office_slice),
        model="stub",
        out=str(tmp_path / "attr0"),
        limit=3,
        num_negatives=2,
        baseline="attention",
        progress=False,
    )
    s = attribution.run(cfg, model=model, tokenizer=tokenizer)
    assert s["mean_target_logprob"] == pytest.approx(-math.log(len(tokenizer)), rel=1e-5)
    assert s["aux_share"] is None and s["mean_delta"]["history"] == pytest.approx(0.0, abs=1e-5)
    assert s["counterfactual"]["drop"]["history_removed"]["mean_target_logprob"] == pytest.approx(
        0.0, abs=1e-5
    )


def test_bad_settings_are_errors(tmp_path, office_slice, tokenizer):
    model = TableLM(torch.zeros(len(tokenizer), len(tokenizer)))
    for bad in ({"method": "saliency"}, {"baseline": "zeros"}):
        cfg = AttributeConfig(
            dataset=str(office_slice), model="stub", out=str(tmp_path / "x"), limit=2, **bad
        )
        with pytest.raises(GdrtError):
            attribution.run(cfg, model=model, tokenizer=tokenizer)
    assert not (tmp_path / "x").exists()


def test_counterfactual_shared_prompt_matches_separate_sequences(office_slice, tokenizer, make_tiny_llama):
    """The KV-cache path (each prompt once, titles continue it) gives the numbers of scoring every
    prompt + title as its own sequence; the same seed gives the same negatives and shuffles."""
    from gdrt_core.attribution import counterfactual_inputs, counterfactual_scores
    from gdrt_core.dataset import Dataset

    model = make_tiny_llama(len(tokenizer), max_position_embeddings=1024)
    ds = Dataset(office_slice)
    examples = ds.examples("test", 3)
    titles = sorted(set(ds.titles.values()))
    kw = dict(num_negatives=4, seed=1, batch_size=4)
    shared = counterfactual_scores(model, tokenizer, ds.domain, examples, titles, shared_prompt=True, **kw)
    separate = counterfactual_scores(model, tokenizer, ds.domain, examples, titles, shared_prompt=False, **kw)
    for condition in shared:
        for (lp_a, rank_a), (lp_b, rank_b) in zip(shared[condition], separate[condition], strict=True):
            assert lp_a == pytest.approx(lp_b, rel=1e-4, abs=1e-5) and rank_a == rank_b
    histories, candidates = counterfactual_inputs(examples[0], titles, 4, seed=1)
    assert candidates[0] == examples[0].target_title and len(set(candidates)) == 5
    assert sorted(histories["history_shuffled"]) == sorted(examples[0].history_titles)
    assert counterfactual_inputs(examples[0], titles, 4, seed=1) == (histories, candidates)


def _example(eid: int, instruction: list[float], prefix: list[float], history: list[float]):
    z = np.zeros(len(instruction), np.float32)
    return attribution.ExampleAttribution(eid, z, np.array(instruction, np.float32), np.array(history, np.float32),
                                          [], np.array(prefix, np.float32))


def _artifact(root, examples):
    """An Attribution artifact holding `examples`' rows, as the stage writes them."""
    import pyarrow as pa

    from gdrt_core.artifacts import write_manifest

    root.mkdir(parents=True)
    rows = [(a.example_id, *r) for a in examples for r in a.rows()]
    pq.write_table(pa.table({
        "example_id": pa.array([r[0] for r in rows], pa.int64()), "segment": [r[1] for r in rows],
        "position": pa.array([r[2] for r in rows], pa.int32()), "score": pa.array([r[3] for r in rows], pa.float32()),
    }), root / attribution.ATTRIBUTIONS_FILE)
    write_manifest(root, "attribution")
    return root


def test_summary_has_the_share_interval_and_the_mean_attribution_per_token():
    """Two examples of one target token each: |instr| + |prefix| = 3 and 1, |hist| = 1 and 1 (signs do not
    count). Share 4/6; resampling example 0 twice gives 6/8, example 1 twice 2/4: the interval is [1/2, 3/4].
    Per target token: instruction (2 + 1) / 2, prefix (1 + 0) / 2, history (1 + 1) / 2."""
    s = summarize([_example(0, [2.0], [-1.0], [1.0]), _example(1, [-1.0], [0.0], [-1.0])])
    assert s["aux_share"] == pytest.approx(4 / 6)
    assert s["aux_share_ci95"] == pytest.approx([1 / 2, 3 / 4])
    assert s["abs_delta_per_token"] == pytest.approx({"instruction": 1.5, "prefix": 0.5, "history": 1.0})
    assert summarize([_example(0, [2.0], [-1.0], [1.0])])["aux_share_ci95"] is None


def test_paired_comparison_of_two_attribution_artifacts_is_hand_derived(tmp_path):
    """a: (aux, hist) per example (3, 1), (1, 1); b: (1, 1), (1, 3); one target token each. Shares 4/6 and 2/6,
    difference 1/3. Paired resamples: example 0 twice 3/4 - 1/2, example 1 twice 1/2 - 1/4, mixed 1/3: the
    interval is [1/4, 1/3]. No example has a lower share under a. History per token: a 1, b 2; example 0
    twice 1 - 1, example 1 twice 1 - 3: difference -1 in [-2, 0]."""
    a = _artifact(tmp_path / "a", [_example(10, [2.0], [1.0], [1.0]), _example(11, [1.0], [0.0], [-1.0])])
    b = _artifact(tmp_path / "b", [_example(11, [0.5], [0.5], [3.0]), _example(10, [1.0], [0.0], [1.0])])
    result = attribution.compare(a, b, resamples=4000)
    assert result["examples"] == 2
    assert result["a"]["aux_share"] == pytest.approx(4 / 6) and result["b"]["aux_share"] == pytest.approx(2 / 6)
    assert result["aux_share_difference"] == pytest.approx(1 / 3)
    assert result["aux_share_difference_ci95"] == pytest.approx([1 / 4, 1 / 3])
    assert result["examples_with_lower_aux_share"] == 0
    history = result["abs_delta_per_token_difference"]["history"]
    assert history["difference"] == pytest.approx(-1.0) and history["ci95"] == pytest.approx([-2.0, 0.0])
    same = attribution.compare(a, a, resamples=200)
    assert same["aux_share_difference"] == 0.0 and same["aux_share_difference_ci95"] == [0.0, 0.0]


def test_comparing_attributions_of_different_examples_is_refused(tmp_path):
    a = _artifact(tmp_path / "a", [_example(1, [1.0], [0.0], [1.0]), _example(2, [1.0], [0.0], [1.0])])
    b = _artifact(tmp_path / "b", [_example(1, [1.0], [0.0], [1.0])])
    with pytest.raises(GdrtError, match=r"attribute different examples \(2 and 1, 1 in both\).*same --dataset"):
        attribution.compare(a, b)
    with pytest.raises(GdrtError, match="missing: attribution artifact directory does not exist"):
        attribution.compare(a, tmp_path / "missing")


def test_compare_attribution_command_prints_and_writes_the_comparison(tmp_path, capsys):
    """`gdrt compare-attribution A B --out F` prints the paired comparison of the hand-derived case above and
    writes compare's result to F; an output inside an input, a missing artifact and a bad --resamples are
    one-line errors (exit 2) that leave no file."""
    from gdrt_core.cli import main

    a = _artifact(tmp_path / "a", [_example(10, [2.0], [1.0], [1.0]), _example(11, [1.0], [0.0], [-1.0])])
    b = _artifact(tmp_path / "b", [_example(11, [0.5], [0.5], [3.0]), _example(10, [1.0], [0.0], [1.0])])
    out = tmp_path / "cmp.json"
    assert main(["compare-attribution", str(a), str(b), "--out", str(out), "--resamples", "4000"], commands={}) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == f"A {a}: auxiliary share 0.6667 (95% 0.5000-0.7500)"
    assert printed[2] == "A - B on the same 2 examples: +0.3333 (+0.2500, +0.3333), lower under A on 0 of 2"
    assert printed[-1] == "  history     -1.0000 (-2.0000, +0.0000)"
    assert json.loads(out.read_text()) == json.loads(json.dumps(attribution.compare(a, b, resamples=4000)))
    link = tmp_path / "link.json"
    link.symlink_to(out)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "manifest.json").write_text("{}")
    for argv, message in (
        ([str(a), str(b), "--out", str(a / "cmp.json")], "the output lies inside an input"),
        ([str(a), str(tmp_path / "missing")], "attribution artifact directory does not exist"),
        ([str(a), str(b), "--resamples", "0"], "--resamples must be between 100 and 1,000,000"),
        ([str(a), str(b), "--resamples", str(10**7)], "--resamples must be between 100 and 1,000,000"),
        ([str(a), str(b), "--seed", "-1"], "--seed must be 0 or more"),
        ([str(a), str(b), "--out", ""], "--out is empty"),
        ([str(a), ""], "B is empty: expected an Attribution artifact directory"),
        (["  ", str(b)], "A is empty"),
        ([str(a), str(b), "--out", str(dataset)], "--out is a directory"),
        ([str(a), str(b), "--out", str(link)], "is not a regular file"),
        ([str(a), str(b), "--out", "/dev/null"], "is not a regular file"),
        ([str(a), str(b), "--out", str(dataset / "manifest.json")], "inside the artifact directory"),
    ):
        assert main(["compare-attribution", *argv], commands={}) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not (a / "cmp.json").exists() and link.is_symlink() and (dataset / "manifest.json").read_text() == "{}"


def test_compare_attribution_of_one_example_has_no_interval_and_refuses_other_units(tmp_path, capsys):
    """One example: no bootstrap interval (printed as such, not a crash); artifacts scored by different methods
    (feature ablation, gradient x input) are not compared: their deltas are not in the same units."""
    from gdrt_core.artifacts import write_manifest
    from gdrt_core.cli import main

    a = _artifact(tmp_path / "a", [_example(1, [2.0], [1.0], [1.0])])
    b = _artifact(tmp_path / "b", [_example(1, [1.0], [0.0], [1.0])])
    assert main(["compare-attribution", str(a), str(b), "--out", str(tmp_path / "one.json")], commands={}) == 0
    printed = capsys.readouterr().out
    assert "A - B on the same 1 examples: +0.2500 (no interval)" in printed
    assert json.loads((tmp_path / "one.json").read_text())["aux_share_difference_ci95"] is None
    write_manifest(b, "attribution", config={"method": "grad_x_input", "baseline": "neutral"})
    with pytest.raises(GdrtError, match="hold different scores .*not in the same units"):
        attribution.compare(a, b)


def test_compare_attribution_names_a_file_or_a_rewritten_table_instead_of_failing(tmp_path, capsys):
    """A file given as an artifact is called a file; an attributions.parquet rewritten without a column, with a
    column of another type or with nulls (its manifest hash updated to match) is one line naming the file and
    the column, not a KeyError traceback."""
    import pyarrow as pa

    from gdrt_core.artifacts import read_table, write_manifest
    from gdrt_core.cli import main

    a = _artifact(tmp_path / "a", [_example(1, [2.0], [1.0], [1.0]), _example(2, [1.0], [0.0], [1.0])])
    b = _artifact(tmp_path / "b", [_example(1, [1.0], [0.0], [1.0]), _example(2, [1.0], [0.0], [1.0])])
    table = pq.read_table(b / attribution.ATTRIBUTIONS_FILE)
    file = tmp_path / "a.json"
    file.write_text("{}")
    assert main(["compare-attribution", str(file), str(b)], commands={}) == 2
    err = capsys.readouterr().err
    assert f"{file}: a file, not an attribution artifact directory" in err and len(err.strip().splitlines()) == 1
    rewritten = {
        "has no column score": table.drop_columns(["score"]),
        "has a column of another type: score is string": table.set_column(
            3, "score", pa.array(["x"] * table.num_rows)),
        "has a column of another type: score is bool": table.set_column(
            3, "score", pa.array([True] * table.num_rows)),
        "column score has empty (null) values": table.set_column(
            3, "score", pa.array([None] * table.num_rows, pa.float32())),
    }
    rewritten.update({
        "holds no token attributions": table.slice(0, 0),
        "holds a score that is not a finite float32": table.set_column(
            3, "score", pa.array([float("nan")] * table.num_rows, pa.float32())),
        "holds a score that is not a finite float32 (nan or inf)": table.set_column(  # 1e300 is inf in float32
            3, "score", pa.array([1e300] * table.num_rows, pa.float64())),
    })
    unknown = table.set_column(1, "segment", pa.array(["foo"] * table.num_rows))
    rewritten["holds no token attributions (no instruction_token, prefix_token, history_token rows)"] = unknown
    for message, bad in rewritten.items():
        pq.write_table(bad, b / attribution.ATTRIBUTIONS_FILE)
        write_manifest(b, "attribution")
        assert main(["compare-attribution", str(a), str(b)], commands={}) == 2
        err = capsys.readouterr().err
        assert f"{b / attribution.ATTRIBUTIONS_FILE}: {message}" in err, err
        assert len(err.strip().splitlines()) == 1, err
    (b / attribution.ATTRIBUTIONS_FILE).unlink()
    (b / attribution.ATTRIBUTIONS_FILE).mkdir()  # a directory in the file's place
    with pytest.raises(GdrtError, match="attributions.parquet: cannot be read as a parquet file"):
        read_table(b / attribution.ATTRIBUTIONS_FILE, {"score": pa.float32()})

