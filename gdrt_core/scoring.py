"""Teacher-forced log-probabilities of target tokens, with parts of the context ablated.

Shared by the grouping stage (r_t = log p_ref(y_t | instruction, y_<t) with the history removed) and the
attribution stage (Δ log p(target) when a segment is ablated).

A request is one token sequence whose last `num_scored` tokens are scored: the result holds
log p(x_i | x_<i) for each of them. Tokens listed in `hidden` are removed from attention: no query attends
to them as keys (each position still attends to itself, so no attention row is empty), and the position
ids of all tokens stay those of the full sequence. Replacing tokens by a neutral token is done by the
caller on `input_ids` (see `replace_tokens`).

The model is called as a Hugging Face causal LM:

    model(input_ids=[batch, seq], attention_mask=[batch, 1, seq, seq] additive float (0 = attend,
          dtype-min = blocked), position_ids=[batch, seq], logits_to_keep=k).logits -> [batch, k, vocab]

Sequences are left-padded, so the scored tokens of every row sit at the end and only the last
`max(num_scored) + 1` logits are materialised (the vocabulary can be large).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ScoringRequest:
    """One sequence to score: log-probs of its last `num_scored` tokens, with `hidden` keys removed."""

    input_ids: list[int]
    num_scored: int
    hidden: list[int] = field(default_factory=list)  # token indices removed from attention
    # the token ids scored at the last `num_scored` positions; None = input_ids there. Differs from the
    # inputs when the scored tokens themselves are replaced as inputs (the generated-prefix ablation).
    labels: list[int] | None = None

    def __post_init__(self) -> None:
        if not 0 < self.num_scored < len(self.input_ids):
            raise ValueError(
                f"num_scored={self.num_scored} must be in [1, {len(self.input_ids) - 1}] "
                f"for a sequence of {len(self.input_ids)} tokens (the first token has no prediction)"
            )
        if self.labels is not None and len(self.labels) != self.num_scored:
            raise ValueError(f"labels has {len(self.labels)} ids, expected num_scored={self.num_scored}")

    @property
    def scored_ids(self) -> list[int]:
        return list(self.labels) if self.labels is not None else list(self.input_ids[-self.num_scored :])


def replace_tokens(input_ids: Sequence[int], indices: Sequence[int], neutral_id: int) -> list[int]:
    """A copy of `input_ids` with the tokens at `indices` replaced by `neutral_id` (the neutral baseline)."""
    out = list(input_ids)
    for i in indices:
        out[i] = neutral_id
    return out


def build_batch(requests: Sequence[ScoringRequest], pad_token_id: int, dtype=None):
    """Left-padded tensors for a batch: input_ids, 4D additive attention mask and position ids.

    Returns (input_ids [batch, seq], attention_mask [batch, 1, seq, seq], position_ids [batch, seq]).
    """
    import torch

    from gdrt_core.collate import pad_token_ids

    dtype = dtype or torch.float32
    input_ids, padding_mask, position_ids = pad_token_ids([r.input_ids for r in requests], pad_token_id)
    batch, length = input_ids.shape
    key_visible = padding_mask.bool()  # [batch, seq]
    for row, r in enumerate(requests):
        if r.hidden:
            key_visible[row, length - len(r.input_ids) + torch.tensor(r.hidden, dtype=torch.long)] = False
    causal = torch.ones((length, length), dtype=torch.bool).tril()  # [seq, seq]
    allowed = causal[None] & key_visible[:, None, :]  # [batch, q, k]
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # every query sees itself: no empty softmax row
    mask = torch.zeros((batch, 1, length, length), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return input_ids, mask, position_ids


def _model_device_dtype(model):
    import torch

    try:
        p = next(model.parameters())
        dtype = p.dtype if p.dtype.is_floating_point else torch.float32
        return p.device, dtype
    except StopIteration:
        return torch.device("cpu"), torch.float32


def _call_logits(model, input_ids, mask, position_ids, keep: int):
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=keep)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits[:, -keep:]  # [batch, keep, vocab] (a model that ignores logits_to_keep returns all)


def score_batch(model, requests: Sequence[ScoringRequest], pad_token_id: int) -> list[np.ndarray]:
    """Log-probs (float32) of the scored tokens of each request, in one forward pass, no gradients."""
    import torch

    device, dtype = _model_device_dtype(model)
    input_ids, mask, position_ids = build_batch(requests, pad_token_id, dtype)
    keep = max(r.num_scored for r in requests) + 1
    with torch.inference_mode():
        logits = _call_logits(
            model, input_ids.to(device), mask.to(device), position_ids.to(device), keep
        )  # [batch, keep, vocab]
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [batch, keep, vocab]
        # logit column keep-1-n+j predicts the row's scored token j (the n last tokens of the row)
        targets = torch.zeros((len(requests), keep - 1), dtype=torch.long)  # [batch, keep-1]
        for row, r in enumerate(requests):
            targets[row, keep - 1 - r.num_scored :] = torch.tensor(r.scored_ids, dtype=torch.long)
        targets = targets.to(device)
        token_lp = logprobs[:, :-1].gather(-1, targets[..., None])[..., 0]  # [batch, keep-1]
        token_lp = token_lp.cpu().numpy().astype(np.float32)
    return [token_lp[row, token_lp.shape[1] - r.num_scored :].copy() for row, r in enumerate(requests)]


def target_logprobs(
    model,
    requests: Sequence[ScoringRequest],
    *,
    pad_token_id: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """Score many requests, batched by length; results in the order of `requests`.

    `on_batch(n)` is called after each batch with its number of requests (progress bars).
    """
    from gdrt_core.collate import length_batches

    results: list[np.ndarray | None] = [None] * len(requests)
    lengths = [len(r.input_ids) for r in requests]
    for batch in length_batches(lengths, batch_size, max_batch_tokens):
        for i, lp in zip(batch, score_batch(model, [requests[i] for i in batch], pad_token_id), strict=True):
            results[i] = lp
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


def _cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` (transformers 5) or `past_key_values` (4.x)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def supports_shared_prompt(model) -> bool:
    """True for Hugging Face causal LMs, whose KV cache lets `shared_prompt_logprobs` score a prompt once."""
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return False
    return isinstance(model, PreTrainedModel)


def shared_prompt_logprobs(
    model,
    prompts: Sequence[list[int]],
    continuations: Sequence[Sequence[list[int]]],
    *,
    pad_token_id: int,
    batch_size: int = 16,
) -> list[list[np.ndarray]]:
    """log p(c_j | prompt, c_<j) for every continuation c of every prompt; each prompt runs once.

    The prompts of a batch run left-padded with a KV cache; the cache rows are then repeated for each
    continuation of their prompt, and all continuations run in one right-padded pass on top of it. Numbers
    equal `target_logprobs` on prompt + continuation (up to float rounding); the cost of scoring K titles
    after one prompt drops from K prompt passes to one prompt pass plus K short ones.
    """
    import torch

    from gdrt_core.collate import length_batches, pad_token_ids

    device, _ = _model_device_dtype(model)
    results: list[list[np.ndarray]] = [[] for _ in prompts]
    for batch in length_batches([len(p) for p in prompts], batch_size):
        ids, mask, positions = pad_token_ids([prompts[i] for i in batch], pad_token_id)  # [batch, prompt] each
        owner = [
            row for row, i in enumerate(batch) for _ in continuations[i]
        ]  # prompt row of each continuation
        conts = [c for i in batch for c in continuations[i]]
        if not conts:
            continue
        if any(len(c) == 0 for c in conts):
            raise ValueError("every continuation needs at least one token")
        with torch.inference_mode():
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                use_cache=True,
                logits_to_keep=1,
            )
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # [batch, vocab]
            cache = getattr(out, "cache", None)
            if cache is None:
                cache = out.past_key_values
            owner_t = torch.tensor(owner, dtype=torch.long)
            cache.reorder_cache(owner_t.to(device))  # rows: [continuations, ...]
            cont_ids, cont_mask, _ = pad_token_ids(conts, pad_token_id, padding_side="right")  # [continuations, cont]
            cont_len = cont_ids.shape[1]
            full_mask = torch.cat([mask[owner_t], cont_mask], dim=1)  # [continuations, prompt + cont]
            start = mask.sum(-1)[owner_t]  # [continuations] real prompt lengths
            cont_pos = start[:, None] + torch.arange(cont_len)[None]  # [continuations, cont]
            out = model(
                input_ids=cont_ids.to(device),
                attention_mask=full_mask.to(device),
                position_ids=cont_pos.to(device),
                use_cache=True,
                **{_cache_kwarg(model): cache},
            )
            rest = torch.log_softmax(out.logits.float(), dim=-1)  # [continuations, cont, vocab]
            first_lp = first[owner_t.to(device), cont_ids[:, 0].to(device)]  # [continuations]
            next_ids = cont_ids[:, 1:].to(device)  # [continuations, cont-1]
            rest_lp = rest[:, :-1].gather(-1, next_ids[..., None])[..., 0]  # [continuations, cont-1]
            token_lp = torch.cat([first_lp[:, None], rest_lp], dim=1).cpu().numpy().astype(np.float32)
        for row, (o, c) in enumerate(zip(owner, conts, strict=True)):
            results[batch[o]].append(token_lp[row, : len(c)].copy())
    return results


def pad_id_of(tokenizer) -> int:
    """The id used for left padding (never attended, so any valid id works)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def load_scoring_model(id_or_dir: str, *, device: str = "auto", dtype: str = "auto"):
    """(model, tokenizer) for scoring: eval mode, an adapter merged into its base (faster, same numbers)."""
    from gdrt_core.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(id_or_dir)
    model = load_model(id_or_dir, device=device, dtype=dtype, merge_adapter=True)
    return model, tokenizer
