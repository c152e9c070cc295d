"""The collator keeps every per-token column aligned under left and right padding; length bucketing."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from gdrt_core.collate import (
    Collator,
    LengthBucketSampler,
    length_bucketed_batches,
    position_ids_from_mask,
    token_group_ids,
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


def test_token_group_ids_places_groups_on_targets():
    ex = _examples()[1]
    assert token_group_ids(ex, [3, 1]) == [-1, -1, -1, 3, 1]
    with pytest.raises(GdrtError, match="3 group ids for an example with 2 target tokens"):
        token_group_ids(ex, [0, 0, 0])


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
        ex.extra["group_ids"] = token_group_ids(ex, [k % 4 for k in range(len(ex.indices(TGT)))])
        examples.append(ex)
    batch = Collator(tok.pad_token_id, padding_side="left")(examples)
    for row, w in enumerate(windows):
        ids = batch["input_ids"][row]
        assert tok.decode(ids[batch["role"][row] == TARGET].tolist()) == quote(w[-1]) + "<eos>"
        for pos, title in enumerate(w[:-1]):
            assert title in tok.decode(ids[(batch["role"][row] == HISTORY) & (batch["history_pos"][row] == pos)])
        groups = batch["group_ids"][row]
        assert ((groups >= 0) == (batch["labels"][row] != IGNORE_INDEX)).all()


# ---------------------------------------------------------------- length bucketing


def test_bucketed_batches_by_hand():
    """lengths 5 1 4 2 3 6, batch 2, bucket 4, no shuffle: bucket [0 1 2 3] sorted longest first is
    0(5) 2(4) 3(2) 1(1) -> [0, 2], [3, 1]; bucket [4 5] -> 5(6) 4(3) -> [5, 4]. A bucket of 3 rounds up to 4.
    """
    lengths = [5, 1, 4, 2, 3, 6]
    assert length_bucketed_batches(lengths, 2, bucket_size=4, shuffle=False) == [[0, 2], [3, 1], [5, 4]]
    assert length_bucketed_batches(lengths, 2, bucket_size=3, shuffle=False) == [[0, 2], [3, 1], [5, 4]]
    # one bucket: globally longest first (the generation order); the short last batch can be dropped
    assert length_bucketed_batches(lengths, 4, shuffle=False) == [[5, 0, 2, 4], [3, 1]]
    assert length_bucketed_batches(lengths, 4, shuffle=False, drop_last=True) == [[5, 0, 2, 4]]


def test_bucketed_batches_are_deterministic_and_cover_everything():
    rng = random.Random(3)
    lengths = [rng.randint(10, 400) for _ in range(1000)]
    first = length_bucketed_batches(lengths, 16, bucket_size=160, seed=7)
    assert first == length_bucketed_batches(lengths, 16, bucket_size=160, seed=7)
    assert first != length_bucketed_batches(lengths, 16, bucket_size=160, seed=8)
    flat = [i for batch in first for i in batch]
    assert sorted(flat) == list(range(1000))
    assert sum(len(b) < 16 for b in first) == 1  # 1000 = 62 * 16 + 8
    # similar lengths: padding is far below that of random batches
    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    shuffled = list(range(1000))
    random.Random(0).shuffle(shuffled)
    random_batches = [shuffled[k:k + 16] for k in range(0, 1000, 16)]
    assert padding(first) < 0.2 * padding(random_batches)


def test_sampler_epochs_and_length():
    lengths = list(range(100))
    sampler = LengthBucketSampler(lengths, 8, bucket_size=32, seed=1)
    epoch0 = list(sampler)
    assert epoch0 == list(sampler) and len(sampler) == len(epoch0) == 13
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    assert sorted(i for b in sampler for i in b) == list(range(100))
    dropping = LengthBucketSampler(lengths, 8, bucket_size=32, seed=1, drop_last=True)
    assert len(dropping) == len(list(dropping)) == 12
    loader = torch.utils.data.DataLoader(
        [TokenizedExample([1] * (n + 1), [1] * (n + 1), [N] * (n + 1), [INS] * (n + 1), [-1] * (n + 1)) for n in lengths],
        batch_sampler=sampler, collate_fn=Collator(0),
    )
    widths = [batch["input_ids"].shape[1] for batch in loader]
    assert len(widths) == 13


def test_bucketing_rejects_bad_sizes():
    with pytest.raises(GdrtError, match="batch_size"):
        length_bucketed_batches([1, 2], 0)
    with pytest.raises(GdrtError, match="bucket_size"):
        length_bucketed_batches([1, 2], 1, bucket_size=0)
