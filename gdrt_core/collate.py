"""Batches of token sequences: padding that keeps every per-token column aligned, and length batching.

The one place where token lists become padded tensors. Training (`train.data.TrainCollator`), teacher-forced
scoring (grouping, attribution), beam search and the embedded model's timing loop all pad through it.

- `pad_rows`: one int column, left- or right-padded to one width ([batch, width] LongTensor).
- `pad_token_ids`: token id lists -> input_ids, attention_mask and position_ids (counted over real tokens).
- `Collator`: a list of `TokenizedExample` (or dicts with the same per-token lists, as training features
  are) -> tensors [batch, seq]: input_ids, attention_mask, labels, role, history_pos, group_ids (and
  position_ids on request, example_id when every example has one; `columns` picks which per-token
  columns come back, since a model's forward rejects keys such as `role`). Every column is padded on the
  same side by the same amount, so token k of an example sits at the same (row, column) in every tensor:

| column         | pad value        | missing from an example |
| -------------- | ---------------- | ----------------------- |
| input_ids      | the pad token id | required                |
| attention_mask | 0                | 1 on every token        |
| labels         | -100             | -100 on every token     |
| role           | -1 (PAD_ROLE)    | -1 on every token       |
| history_pos    | -1               | -1 on every token       |
| group_ids      | -1 (NO_GROUP)    | -1 on every token       |

Right padding is for training and teacher-forced scoring of continuations; left padding is for generation
and for scoring the last tokens of a sequence, where every row's last token must be the batch's last
column. With left padding a causal LM also needs position ids that start at each row's first real token
(`position_ids_from_mask`); with them a padded row scores exactly as the row alone. The value on padding
never matters to the real tokens (padding is never attended); it is 1 for the Collator (as `generate`)
and 0 for `pad_token_ids` (what scoring and beam search use).

`length_batches` groups indices of similar length, longest first, to cut padding; optionally capped by
padded tokens per batch. Deterministic: ties keep the input order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gdrt_core.errors import GdrtError, article
from gdrt_core.tokenization import IGNORE_INDEX, TokenizedExample

PAD_ROLE = -1  # role of padding tokens
NO_GROUP = -1  # group id of non-target and padding tokens

PAD_VALUES = {"attention_mask": 0, "labels": IGNORE_INDEX, "role": PAD_ROLE, "history_pos": -1, "group_ids": NO_GROUP}
TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels", "role", "history_pos", "group_ids")
PADDING_SIDES = ("left", "right")


def pad_rows(rows: Sequence[Sequence[int]], pad_value: int, padding_side: str, width: int | None = None) -> Any:
    """A LongTensor [batch, width] holding each row left- or right-aligned, `pad_value` elsewhere.

    `width` defaults to the longest row.
    """
    import numpy as np
    import torch

    if padding_side not in PADDING_SIDES:
        raise GdrtError(f"padding_side {padding_side!r} is not one of {', '.join(PADDING_SIDES)}")
    if width is None:
        width = max((len(row) for row in rows), default=0)
    padded = np.full((len(rows), width), pad_value, dtype=np.int64)  # [batch, width]
    for i, row in enumerate(rows):
        if len(row) == 0:
            continue
        if padding_side == "left":
            padded[i, width - len(row):] = row
        else:
            padded[i, : len(row)] = row
    return torch.from_numpy(padded)


def pad_token_ids(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, padding_side: str = "left", pad_position: int = 0
) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids), each a LongTensor [batch, width], for token id lists.

    Position ids count real tokens only (0 at each row's first real token) and are `pad_position` on
    padding, so a left-padded row sees the positions it would see alone.
    """
    input_ids = pad_rows(sequences, pad_token_id, padding_side)  # [batch, width]
    attention_mask = pad_rows([[1] * len(s) for s in sequences], 0, padding_side)  # [batch, width]
    return input_ids, attention_mask, position_ids_from_mask(attention_mask, pad_position)


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
        raise GdrtError(f"batch example {row} is {article(type(example).__name__)}, "
                        "not a TokenizedExample or a dict")
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
    # example_id [batch] when every example has one (False: a Trainer would hand it to the model's forward)
    return_example_id: bool = True

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
        import torch

        if not examples:
            raise GdrtError("cannot collate an empty batch")
        rows = [_columns(example, row) for row, example in enumerate(examples)]
        width = max(len(columns["input_ids"]) for columns, _ in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        pad_values = {"input_ids": self.pad_token_id, **PAD_VALUES}
        batch = {
            name: pad_rows([columns[name] for columns, _ in rows], pad_values[name], self.padding_side, width)
            for name in TOKEN_COLUMNS
        }  # [batch, seq] each
        _check_groups_on_targets(batch["group_ids"], batch["labels"], self.padding_side, rows)
        if self.return_position_ids:
            batch["position_ids"] = position_ids_from_mask(batch["attention_mask"])
        for name in TOKEN_COLUMNS:
            if name not in self.columns:
                del batch[name]
        example_ids = [example_id for _, example_id in rows]
        if self.return_example_id and all(example_id is not None for example_id in example_ids):
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
        hint="group ids belong on target tokens only (labels other than -100)",
    )


def position_ids_from_mask(attention_mask: Any, pad_position: int = 1) -> Any:
    """Positions counted over real tokens only (0 at each row's first real token; `pad_position` on padding,
    1 as `generate` does), so a left-padded row sees the positions it would see alone."""
    positions = attention_mask.long().cumsum(-1) - 1  # [batch, seq]
    return positions.masked_fill(attention_mask == 0, pad_position)


# ---------------------------------------------------------------- length batching


def length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices in batches of similar length: all indices sorted longest first (ties in input order), cut
    into batches of at most `batch_size` rows and, with `max_batch_tokens`, at most that many padded tokens
    (longest row x rows; a row longer than the cap still gets a batch of its own)."""
    if batch_size < 1:
        raise GdrtError(f"batch_size must be a positive integer, not {batch_size}")
    if max_batch_tokens is not None and max_batch_tokens < 1:
        raise GdrtError(f"max_batch_tokens must be a positive integer or None, not {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep the input order
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        too_many_tokens = max_batch_tokens is not None and longest * (len(current) + 1) > max_batch_tokens
        if current and (len(current) >= batch_size or too_many_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
