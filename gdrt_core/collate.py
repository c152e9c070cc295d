"""Batches of tokenised examples: padding that keeps every per-token column aligned, and length bucketing.

`Collator` turns a list of `TokenizedExample` (or dicts with the same per-token lists, as training
features are) into tensors [batch, seq]: input_ids, attention_mask, labels, role, history_pos, group_ids
(and position_ids on request, example_id when every example has one; `columns` picks which per-token
columns come back, since a model's forward rejects keys such as `role`). Every column is padded on the same
side by the same amount, so token k of an example sits at the same (row, column) in every tensor:

| column         | pad value        | missing from an example |
| -------------- | ---------------- | ----------------------- |
| input_ids      | the pad token id | required                |
| attention_mask | 0                | 1 on every token        |
| labels         | -100             | -100 on every token     |
| role           | -1 (PAD_ROLE)    | -1 on every token       |
| history_pos    | -1               | -1 on every token       |
| group_ids      | -1 (NO_GROUP)    | -1 on every token       |

Right padding is for training and teacher-forced scoring; left padding is for generation, where every
row's last prompt token must be the batch's last column. With left padding a causal LM also needs
position ids that start at each row's first real token: `return_position_ids=True` gives them (the same
formula `generate` uses), and with them a padded row scores exactly as the row alone.

Length bucketing (`length_bucketed_batches`, `LengthBucketSampler`) groups indices of similar length into
batches to cut padding: shuffle (seeded), cut into buckets of a few hundred examples, sort each bucket by
length, cut into batches, shuffle the batch order. Same seed and epoch, same batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gdrt_core.errors import GdrtError
from gdrt_core.tokenization import IGNORE_INDEX, TARGET, TokenizedExample

PAD_ROLE = -1  # role of padding tokens
NO_GROUP = -1  # group id of non-target and padding tokens

PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "role": PAD_ROLE, "history_pos": -1, "group_ids": NO_GROUP}
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "role", "history_pos", "group_ids")
PADDING_SIDES = ("left", "right")


def token_group_ids(example: TokenizedExample, target_groups: Sequence[int]) -> list[int]:
    """Per-token group ids from one group per target token (in order): -1 on every other token."""
    targets = example.indices(TARGET)
    if len(targets) != len(target_groups):
        raise GdrtError(
            f"{len(target_groups)} group ids for an example with {len(targets)} target tokens",
            hint="the groups were computed with another tokenizer or prompt; rebuild them (gdrt group)",
        )
    group_ids = [NO_GROUP] * len(example)
    for index, group in zip(targets, target_groups, strict=True):
        group_ids[index] = int(group)
    return group_ids


def _columns(example: TokenizedExample | Mapping[str, Any], row: int) -> tuple[dict[str, list[int]], int | None]:
    """The per-token columns of one example (defaults filled in) and its example_id if it has one."""
    if isinstance(example, TokenizedExample):
        source: Mapping[str, Any] = {
            "input_ids": example.input_ids, "attention_mask": example.attention_mask, "labels": example.labels,
            "role": example.role, "history_pos": example.history_pos,
            **{k: v for k, v in example.extra.items() if k in ("group_ids", "example_id")},
        }
    elif isinstance(example, Mapping):
        source = example
    else:
        raise GdrtError(f"batch example {row} is a {type(example).__name__}, not a TokenizedExample or a dict")
    if "input_ids" not in source:
        raise GdrtError(f"batch example {row} has no input_ids", hint=f"keys are {sorted(source)}")
    n = len(source["input_ids"])
    if n == 0:
        raise GdrtError(f"batch example {row} has no tokens")
    columns = {"input_ids": source["input_ids"]}
    for name in TOKEN_COLUMNS[1:]:
        values = source.get(name)
        if values is None:
            values = [1] * n if name == "attention_mask" else [PAD_VALUES[name]] * n
        elif len(values) != n:
            raise GdrtError(
                f"batch example {row}: {name} has {len(values)} values for {n} tokens",
                hint="every per-token column must have one value per input id",
            )
        columns[name] = values
    example_id = source.get("example_id")
    return columns, (None if example_id is None else int(example_id))


@dataclass
class Collator:
    """Pads a list of examples into a dict of LongTensors (module docstring). Picklable for DataLoader workers."""

    pad_token_id: int
    padding_side: str = "right"  # "left" for generation
    pad_to_multiple_of: int | None = None
    return_position_ids: bool = False
    # the per-token columns to return (a model's forward rejects keys it does not know, such as role)
    columns: tuple[str, ...] = TOKEN_COLUMNS

    def __post_init__(self) -> None:
        unknown = [c for c in self.columns if c not in TOKEN_COLUMNS]
        if unknown:
            raise GdrtError(f"unknown collator columns {unknown}", hint=f"choose from {', '.join(TOKEN_COLUMNS)}")
        if self.padding_side not in PADDING_SIDES:
            raise GdrtError(f"padding_side {self.padding_side!r} is not one of {', '.join(PADDING_SIDES)}")
        if self.pad_to_multiple_of is not None and self.pad_to_multiple_of < 1:
            raise GdrtError(f"pad_to_multiple_of must be a positive integer, not {self.pad_to_multiple_of}")
        if self.pad_token_id is None:
            raise GdrtError("the collator needs a pad token id", hint="set tokenizer.pad_token (e.g. to EOS)")

    def __call__(self, examples: Sequence[TokenizedExample | Mapping[str, Any]]) -> dict[str, Any]:
        import numpy as np
        import torch

        if not examples:
            raise GdrtError("cannot collate an empty batch")
        rows = [_columns(example, row) for row, example in enumerate(examples)]
        width = max(len(columns["input_ids"]) for columns, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, **PAD_VALUES}
        batch = {}
        left = self.padding_side == "left"
        for name in TOKEN_COLUMNS:
            padded = np.full((len(rows), width), pad_values[name], dtype=np.int64)  # [batch, seq]
            for row, (columns, _) in enumerate(rows):
                values = columns[name]
                if left:
                    padded[row, width - len(values):] = values
                else:
                    padded[row, : len(values)] = values
            batch[name] = torch.from_numpy(padded)
        _check_groups_on_targets(batch["group_ids"], batch["labels"], self.padding_side, rows)
        if self.return_position_ids:
            batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
        for name in TOKEN_COLUMNS:
            if name not in self.columns:
                del batch[name]
        example_ids = [example_id for _, example_id in rows]
        if all(example_id is not None for example_id in example_ids):
            batch["example_id"] = torch.tensor(example_ids, dtype=torch.long)  # [batch]
        return batch


def _check_groups_on_targets(group_ids: Any, labels: Any, padding_side: str, rows: list) -> None:
    """A group id on a non-target token means the columns were built misaligned."""
    wrong = (group_ids != NO_GROUP) & (labels == IGNORE_INDEX)  # [batch, seq]
    if not bool(wrong.any()):
        return
    row, column = (int(v) for v in wrong.nonzero()[0])
    n = len(rows[row][0]["input_ids"])
    token = column if padding_side == "right" else column - (group_ids.shape[1] - n)
    raise GdrtError(
        f"batch example {row}: token {token} has group id {int(group_ids[row, column])} but is not a target "
        "token (label -100)",
        hint="group ids belong on target tokens only; build them with token_group_ids",
    )


def position_ids_from_mask(attention_mask: Any) -> Any:
    """Positions counted over real tokens only (0 at each row's first real token; 1 on padding, as
    `generate` does), so a left-padded row sees the positions it would see alone."""
    positions = attention_mask.long().cumsum(-1) - 1  # [batch, seq]
    return positions.masked_fill(attention_mask == 0, 1)


# ---------------------------------------------------------------- length bucketing


def length_bucketed_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    bucket_size: int | None = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> list[list[int]]:
    """Index batches of similar length.

    With `shuffle`, indices are shuffled (seeded) before bucketing and the batches are shuffled after, so
    epochs differ by seed but never depend on anything else. `bucket_size` (rounded up to a multiple of
    `batch_size`; None = the whole dataset) is how many examples are sorted together, longest first:
    small buckets keep more randomness, large ones less padding. Without `shuffle` the order is the
    input order bucket by bucket (with bucket_size None: all indices sorted by decreasing length, the
    order to feed generation). Only the last batch can be short; `drop_last` drops it.
    """
    if batch_size < 1:
        raise GdrtError(f"batch_size must be a positive integer, not {batch_size}")
    if bucket_size is not None and bucket_size < 1:
        raise GdrtError(f"bucket_size must be a positive integer or None, not {bucket_size}")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if shuffle:
        rng.shuffle(order)
    bucket = len(order) if bucket_size is None else -(-bucket_size // batch_size) * batch_size
    bucket = max(bucket, 1)
    sorted_order: list[int] = []
    for start in range(0, len(order), bucket):
        chunk = order[start:start + bucket]
        sorted_order += sorted(chunk, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    batches = [sorted_order[start:start + batch_size] for start in range(0, len(sorted_order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle:
        rng.shuffle(batches)
    return batches


class LengthBucketSampler:
    """A DataLoader `batch_sampler` yielding `length_bucketed_batches`, reshuffled per epoch (`set_epoch`).

    Epoch e uses seed `seed * 1_000_003 + e`: the same seed and epoch give the same batches in any process.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        bucket_size: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.bucket_size = batch_size * 50 if bucket_size is None and shuffle else bucket_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        return length_bucketed_batches(
            self.lengths, self.batch_size, bucket_size=self.bucket_size, shuffle=self.shuffle,
            seed=self.seed * 1_000_003 + self.epoch, drop_last=self.drop_last,
        )

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        full, rest = divmod(len(self.lengths), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)
