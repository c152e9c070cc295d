"""The one batching module: the collator keeps every per-token column aligned under left and right padding;
pad_token_ids pads prompts and continuations; length batching. The `reference_*` functions are the padding
and batching code that training, scoring, beam search and the timing loop each had before they called this
module: the equivalence tests pin that they get the very same tensors and batches."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gdrt_core.collate import (
    Collator,
    length_batches,
    pad_rows,
    pad_token_ids,
    position_ids_from_mask,
)
from gdrt_core.errors import GdrtError
from gdrt_core.prompts import quote, render
from gdrt_core.tokenization import HISTORY, IGNORE_INDEX, TARGET, TokenizedExample, tokenize_example

OFFICE_TITLES = Path(__file__).resolve().parents[2] / "data" / "office" / "id2name4Rec.json"
INS, HIS, TGT, N = 0, 1, 2, -100


def _examples() -> list[TokenizedExample]:
    """A: 3 tokens (one history, one target, group 2); B: 5 tokens (two history, two targets, groups 0, 1);
    C: 2 tokens without group ids."""
    a = TokenizedExample([5, 6, 7], [1, 1, 1], [N, N, 7], [INS, HIS, TGT], [-1, 0, -1], extra={"group_ids": [-1, -1, 2]})
    b = TokenizedExample(
        [8, 9, 10, 11, 12], [1] * 5, [N, N, N, 11, 12], [INS, HIS, HIS, TGT, TGT], [-1, 0, 1, -1, -1],
        extra={"group_ids": [-1, -1, -1, 0, 1]},
    )
    c = TokenizedExample([13, 14], [1, 1], [N, 14], [INS, TGT], [-1, -1])
    return [a, b, c]


def test_right_padding_by_hand():
    batch = Collator(pad_token_id=0)(_examples())
    expected = {
        "input_ids": [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]],
        "attention_mask": [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]],
        "labels": [[N, N, 7, N, N], [N, N, N, 11, 12], [N, 14, N, N, N]],
        "role": [[INS, HIS, TGT, -1, -1], [INS, HIS, HIS, TGT, TGT], [INS, TGT, -1, -1, -1]],
        "history_pos": [[-1, 0, -1, -1, -1], [-1, 0, 1, -1, -1], [-1, -1, -1, -1, -1]],
        "group_ids": [[-1, -1, 2, -1, -1], [-1, -1, -1, 0, 1], [-1, -1, -1, -1, -1]],
    }
    assert set(batch) == set(expected)
    for name, rows in expected.items():
        assert batch[name].dtype == torch.long and batch[name].tolist() == rows, name


def test_left_padding_by_hand():
    """Position ids = cumsum(mask) - 1, and 1 on padding: row A (mask 0 0 1 1 1) -> 1 1 0 1 2."""
    batch = Collator(pad_token_id=0, padding_side="left", return_position_ids=True)(_examples())
    expected = {
        "input_ids": [[0, 0, 5, 6, 7], [8, 9, 10, 11, 12], [0, 0, 0, 13, 14]],
        "attention_mask": [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]],
        "labels": [[N, N, N, N, 7], [N, N, N, 11, 12], [N, N, N, N, 14]],
        "role": [[-1, -1, INS, HIS, TGT], [INS, HIS, HIS, TGT, TGT], [-1, -1, -1, INS, TGT]],
        "history_pos": [[-1, -1, -1, 0, -1], [-1, 0, 1, -1, -1], [-1, -1, -1, -1, -1]],
        "group_ids": [[-1, -1, -1, -1, 2], [-1, -1, -1, 0, 1], [-1, -1, -1, -1, -1]],
        "position_ids": [[1, 1, 0, 1, 2], [0, 1, 2, 3, 4], [1, 1, 1, 0, 1]],
    }
    for name, rows in expected.items():
        assert batch[name].tolist() == rows, name


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("multiple", [None, 4, 8])
def test_columns_stay_aligned(side, multiple):
    """Reading the real tokens (mask 1) of each row, in order, gives back every column of the example."""
    examples = _examples()
    batch = Collator(pad_token_id=99, padding_side=side, pad_to_multiple_of=multiple)(examples)
    width = batch["input_ids"].shape[1]
    assert width == {None: 5, 4: 8, 8: 8}[multiple]
    for row, ex in enumerate(examples):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == ex.input_ids
        assert batch["labels"][row][real].tolist() == ex.labels
        assert batch["role"][row][real].tolist() == ex.role
        assert batch["history_pos"][row][real].tolist() == ex.history_pos
        assert batch["group_ids"][row][real].tolist() == ex.extra.get("group_ids", [-1] * len(ex))
        assert set(batch["input_ids"][row][~real].tolist()) <= {99}
        assert set(batch["labels"][row][~real].tolist()) <= {IGNORE_INDEX}
        real_columns = real.nonzero().flatten().tolist()
        assert real_columns == list(range(len(ex))) if side == "right" else list(range(width - len(ex), width))


def test_training_feature_dicts_are_accepted():
    """The train stage's features (no role / history_pos) collate with those columns filled with -1."""
    features = [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1], "labels": [N, 2, 3], "group_ids": [-1, 0, 1],
         "example_id": 7},
        {"input_ids": [4], "attention_mask": [1], "labels": [4], "group_ids": [3], "example_id": 9},
    ]
    batch = Collator(pad_token_id=0)(features)
    assert batch["example_id"].tolist() == [7, 9]
    assert batch["role"].tolist() == [[-1, -1, -1], [-1, -1, -1]]
    assert batch["group_ids"].tolist() == [[-1, 0, 1], [3, -1, -1]]
    no_mask = Collator(pad_token_id=0)([{"input_ids": [1, 2]}, {"input_ids": [3]}])
    assert no_mask["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert no_mask["labels"].tolist() == [[N, N], [N, N]] and "example_id" not in no_mask


def test_columns_can_be_restricted_for_a_model_forward():
    batch = Collator(0, columns=("input_ids", "attention_mask", "labels"), return_position_ids=True)(_examples())
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
    with pytest.raises(GdrtError, match="unknown collator columns \\['roles'\\]"):
        Collator(0, columns=("input_ids", "roles"))


def test_misaligned_inputs_are_clear_errors():
    a, b, _ = _examples()
    with pytest.raises(GdrtError, match="batch example 1: token 0 has group id 0 but is not a target"):
        Collator(0)([a, {"input_ids": [1, 2], "labels": [N, 2], "group_ids": [0, 0]}])
    with pytest.raises(GdrtError, match="batch example 0: role has 2 values for 3 tokens"):
        Collator(0)([{"input_ids": [1, 2, 3], "role": [0, 1]}])
    with pytest.raises(GdrtError, match="batch example 1 has no tokens"):
        Collator(0)([b, {"input_ids": []}])
    with pytest.raises(GdrtError, match="padding_side 'top'"):
        Collator(0, padding_side="top")
    with pytest.raises(GdrtError, match="pad token"):
        Collator(None)
    with pytest.raises(GdrtError, match="empty batch"):
        Collator(0)([])


def test_collator_pickles():
    import pickle

    collator = Collator(3, padding_side="left", pad_to_multiple_of=8)
    assert pickle.loads(pickle.dumps(collator)) == collator


def test_position_ids_from_mask_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert position_ids_from_mask(mask).tolist() == [[1, 1, 0, 1], [0, 1, 2, 1]]


# ---------------------------------------------------------------- alignment as a model sees it


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_score_as_the_rows_alone(tiny_llama, side):
    """Logits at every real token of a padded batch equal those of the example run alone (float32)."""
    rng = random.Random(1)
    examples = []
    for n in (3, 9, 6):
        ids = [rng.randrange(1, 32) for _ in range(n)]
        examples.append(TokenizedExample(ids, [1] * n, [N] * (n - 2) + ids[-2:], [INS] * (n - 2) + [TGT, TGT], [-1] * n))
    batch = Collator(0, padding_side=side, pad_to_multiple_of=4, return_position_ids=True)(examples)
    with torch.no_grad():
        logits = tiny_llama(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]
        ).logits  # [batch, seq, vocab]
        for row, ex in enumerate(examples):
            alone = tiny_llama(input_ids=torch.tensor([ex.input_ids])).logits[0]  # [len, vocab]
            real = batch["attention_mask"][row].bool()
            torch.testing.assert_close(logits[row][real], alone, atol=1e-5, rtol=1e-5)
            target = batch["role"][row] == TGT
            assert batch["input_ids"][row][target].tolist() == ex.input_ids[-2:]


def test_real_examples_collate_with_roles_intact():
    """Real Office windows tokenised with a byte-level BPE trained here, left padded for generation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    titles = list(json.loads(OFFICE_TITLES.read_text(encoding="utf-8")).values())
    rng = random.Random(0)
    windows = [rng.sample(titles, rng.randint(2, 8)) for _ in range(6)]
    inner = Tokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    inner.train_from_iterator(
        [render("office", w[:-1], w[-1]).text for w in windows],
        trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            special_tokens=["<pad>", "<eos>"], show_progress=False),
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>", pad_token="<pad>")
    examples = []
    for w in windows:
        ex = tokenize_example(tok, render("office", w[:-1], w[-1]))
        targets = ex.indices(TGT)
        ex.extra["group_ids"] = [targets.index(i) % 4 if i in targets else -1 for i in range(len(ex))]
        examples.append(ex)
    batch = Collator(tok.pad_token_id, padding_side="left")(examples)
    for row, w in enumerate(windows):
        ids = batch["input_ids"][row]
        assert tok.decode(ids[batch["role"][row] == TARGET].tolist()) == quote(w[-1]) + "<eos>"
        for pos, title in enumerate(w[:-1]):
            assert title in tok.decode(ids[(batch["role"][row] == HISTORY) & (batch["history_pos"][row] == pos)])
        groups = batch["group_ids"][row]
        assert ((groups >= 0) == (batch["labels"][row] != IGNORE_INDEX)).all()


# ---------------------------------------------------------------- pad_rows and pad_token_ids


def test_pad_token_ids_by_hand():
    """[5, 6, 7] and [8]: left -> ids [[5 6 7] [0 0 8]], mask [[1 1 1] [0 0 1]], positions [[0 1 2] [0 0 0]]
    (0 on padding); right -> [[5 6 7] [8 0 0]], positions [[0 1 2] [0 0 0]]; pad_position=1 marks padding."""
    ids, mask, pos = pad_token_ids([[5, 6, 7], [8]], 0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
    ids, mask, pos = pad_token_ids([[5, 6, 7], [8]], 9, padding_side="right", pad_position=1)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pos.tolist() == [[0, 1, 2], [0, 1, 1]]
    assert all(t.dtype == torch.long for t in (ids, mask, pos))
    assert pad_rows([[1], [2, 3]], -1, "left", width=4).tolist() == [[-1, -1, -1, 1], [-1, -1, 2, 3]]
    with pytest.raises(GdrtError, match="padding_side 'top'"):
        pad_rows([[1]], 0, "top")


# ---------------------------------------------------------------- length batching


def test_length_batches_by_hand():
    """lengths 5 1 4 2 3 6 sorted longest first: 5(6) 0(5) 2(4) 4(3) 3(2) 1(1); batch 4 -> [5 0 2 4], [3 1].
    A cap of 12 padded tokens: [5, 0] is 6 x 2 = 12, adding 2 would be 6 x 3 = 18 -> [5 0], [2 4 3] (4 x 3),
    [1]. Ties keep the input order."""
    lengths = [5, 1, 4, 2, 3, 6]
    assert length_batches(lengths, 4) == [[5, 0, 2, 4], [3, 1]]
    assert length_batches(lengths, 4, max_batch_tokens=12) == [[5, 0], [2, 4, 3], [1]]
    assert length_batches([2, 3, 2, 3], 3) == [[1, 3, 0], [2]]
    assert length_batches([100, 1], 8, max_batch_tokens=10) == [[0], [1]]  # over the cap: a batch alone
    assert length_batches([], 4) == []
    with pytest.raises(GdrtError, match="batch_size"):
        length_batches([1, 2], 0)
    with pytest.raises(GdrtError, match="max_batch_tokens"):
        length_batches([1, 2], 1, max_batch_tokens=0)


def test_length_batches_caps_padded_tokens():
    """Lengths [3, 10, 5, 7]: longest first -> [1, 3, 2, 0]; pairs [[1, 3], [2, 0]].
    With 12 padded tokens at most: 10+10 > 12 and 7+7 > 12 split, 5+5 <= 12 joins: [[1], [3], [2, 0]]."""
    assert length_batches([3, 10, 5, 7], 2) == [[1, 3], [2, 0]]
    assert length_batches([3, 10, 5, 7], 8, max_batch_tokens=12) == [[1], [3], [2, 0]]


# ---------------------------------------------------------------- equivalence with the code it replaced


def reference_generation_batches(prompts, batch_size):
    """generation.rank_prompts' batching as it is: sorted by length, reverse=True (stable), cut every batch_size."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]), reverse=True)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def reference_train_pad_batch(features, pad_token_id):
    """train.data.pad_batch as it was (the Trainer's collator)."""
    width = max(len(f["input_ids"]) for f in features)

    def padded(key, value):
        return torch.tensor([f[key] + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

    return {"input_ids": padded("input_ids", pad_token_id), "attention_mask": padded("attention_mask", 0),
            "labels": padded("labels", -100), "group_ids": padded("group_ids", -1)}


def reference_left_pad(prompts, pad_token_id):
    """The left padding beam search used before it went through collate."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        attention_mask[i, width - len(p):] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask, position_ids


def reference_scoring_build_batch(sequences, hidden, pad_token_id):
    """scoring.build_batch's padding as it was: ids, key visibility and positions (arange, 0 on padding)."""
    length = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    key_visible = torch.zeros((len(sequences), length), dtype=torch.bool)
    position_ids = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, (s, h) in enumerate(zip(sequences, hidden, strict=True)):
        pad = length - len(s)
        input_ids[row, pad:] = torch.tensor(s, dtype=torch.long)
        position_ids[row, pad:] = torch.arange(len(s))
        key_visible[row, pad:] = True
        if h:
            key_visible[row, pad + torch.tensor(h, dtype=torch.long)] = False
    return input_ids, key_visible, position_ids


def reference_shared_prompt_padding(prompts, continuations, pad_token_id):
    """scoring.shared_prompt_logprobs' padding as it was: left-padded prompts (positions clamped at 0) and
    right-padded continuations."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, length - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, length - len(p):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cont_len = max(len(c) for c in continuations)
    cont_ids = torch.full((len(continuations), cont_len), pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((len(continuations), cont_len), dtype=torch.long)
    for row, c in enumerate(continuations):
        cont_ids[row, : len(c)] = torch.tensor(c, dtype=torch.long)
        cont_mask[row, : len(c)] = 1
    return ids, mask, positions, cont_ids, cont_mask


def reference_timing_batch(chunk, pad):
    """embedded.time_sft_steps' batch as it was (right padding of TokenizedExamples)."""
    width = max(len(x) for x in chunk)
    return (
        torch.tensor([x.input_ids + [pad] * (width - len(x)) for x in chunk]),
        torch.tensor([x.attention_mask + [0] * (width - len(x)) for x in chunk]),
        torch.tensor([x.labels + [IGNORE_INDEX] * (width - len(x)) for x in chunk]),
    )


def _random_sequences(rng, n, low=1, high=40):
    return [[rng.randrange(3, 500) for _ in range(rng.randint(low, high))] for _ in range(n)]


def _same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("seed", range(5))
def test_length_batches_equal_the_generation_order(seed):
    """Many lengths with ties, every batch size: the batches rank_prompts makes. (scoring.length_batches,
    which grouping and attribution used, is this function moved here; its by-hand test moved with it.)"""
    rng = random.Random(seed)
    lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 80))]
    for batch_size in (1, 3, 16, 100):
        assert length_batches(lengths, batch_size) == reference_generation_batches(
            [[0] * n for n in lengths], batch_size)


@pytest.mark.parametrize("seed", range(5))
def test_train_collator_equals_the_old_pad_batch(seed):
    """Training features (ids, mask, labels, group ids on the targets, example_id): same keys, same tensors."""
    from gdrt_core.train.data import TrainCollator, pad_batch

    rng = random.Random(seed)
    features = []
    for k, ids in enumerate(_random_sequences(rng, rng.randint(1, 9))):
        n_target = rng.randint(0, len(ids))
        labels = [N] * (len(ids) - n_target) + ids[len(ids) - n_target:]
        groups = [-1] * (len(ids) - n_target) + [rng.randrange(4) for _ in range(n_target)]
        features.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels,
                         "group_ids": groups, "example_id": 100 + k})
    expected = reference_train_pad_batch(features, pad_token_id=2)
    for batch in (TrainCollator(2)(features), pad_batch(features, 2)):
        assert list(batch) == list(expected)
        for key in expected:
            assert _same(batch[key], expected[key]), key


@pytest.mark.parametrize("seed", range(5))
def test_pad_token_ids_equals_generation_left_pad(seed):
    """What beam search's own left padding returned, tensor for tensor."""
    prompts = _random_sequences(random.Random(seed), random.Random(seed).randint(1, 9))
    for got, want in zip(pad_token_ids(prompts, 7), reference_left_pad(prompts, 7), strict=True):
        assert _same(got, want)


@pytest.mark.parametrize("seed", range(5))
def test_scoring_batches_equal_the_old_padding(seed):
    """scoring.build_batch (ids, 4D mask from key visibility, positions) and shared_prompt_logprobs' prompt
    and continuation padding give the tensors they gave before."""
    from gdrt_core.scoring import ScoringRequest, build_batch

    rng = random.Random(seed)
    sequences = _random_sequences(rng, rng.randint(1, 9), low=2)
    hidden = [sorted(rng.sample(range(len(s)), rng.randint(0, len(s) - 1))) for s in sequences]
    ids, mask, pos = build_batch([ScoringRequest(s, 1, hidden=h) for s, h in zip(sequences, hidden, strict=True)], 0)
    ref_ids, key_visible, ref_pos = reference_scoring_build_batch(sequences, hidden, 0)
    assert _same(ids, ref_ids) and _same(pos, ref_pos)
    length = ids.shape[1]
    allowed = torch.ones((length, length), dtype=torch.bool).tril()[None] & key_visible[:, None, :]
    allowed |= torch.eye(length, dtype=torch.bool)[None]
    assert torch.equal(mask[:, 0] == 0, allowed)

    continuations = _random_sequences(rng, rng.randint(1, 9), high=6)
    ref = reference_shared_prompt_padding(sequences, continuations, 0)
    got = (*pad_token_ids(sequences, 0), *pad_token_ids(continuations, 0, padding_side="right")[:2])
    for a, b in zip(got, ref, strict=True):
        assert _same(a, b)


def test_timing_batches_equal_the_old_ones():
    """embedded.time_sft_steps now collates with Collator(pad, columns=(ids, mask, labels))."""
    rng = random.Random(4)
    chunk = []
    for ids in _random_sequences(rng, 6, low=3):
        chunk.append(TokenizedExample(ids, [1] * len(ids), [N] * (len(ids) - 2) + ids[-2:],
                                      [INS] * (len(ids) - 2) + [TGT, TGT], [-1] * len(ids)))
    batch = Collator(1, columns=("input_ids", "attention_mask", "labels"), return_example_id=False)(chunk)
    for got, want in zip(batch.values(), reference_timing_batch(chunk, 1), strict=True):
        assert _same(got, want)
