"""The attribution stage (method.md §3): how much a model's target log-prob owes to the auxiliary tokens
(the template and the already generated title prefix) versus the user's history.

Feature ablation (default). For an example, s = sum of the teacher-forced target token log-probs. Ablating a
segment and re-scoring gives Δ = s - s_ablated (positive: the segment helps predict the target):

- `instruction`: every instruction-role token (template, quotes, separators, response header), BOS kept;
- `history`: every history-title token; `history_item` i: the tokens of history title i (0 = oldest);
- `prefix_token` t: the generated prefix y_<t of target token t: the target tokens as inputs are replaced by
  the neutral token (and, with the attention baseline, also removed from attention), in one pass for all t,
  since the prediction of y_t only sees inputs up to y_{t-1}.

Per target token the same passes also give `instruction_token` t and `history_token` t (Δ log p(y_t)).
Baselines: `neutral` replaces the ablated tokens by a neutral token (default: the pad token), `attention`
removes them from attention with position ids unchanged (gdrt_core.scoring). Cost: 4 + history-items forward
passes per example, batched across examples by length.

Gradient x input (`method=grad_x_input`) is the cheaper alternative: one forward and one backward pass;
segment scores are the sums of (d s / d embedding) . embedding over the segment's tokens (no per-token split).

Summary (summary.json):
- aux_share = A / (A + H), aux_interaction_ratio = A / H with, over all target tokens of all examples,
  A = sum |Δ instruction_token| + |Δ prefix_token| and H = sum |Δ history_token| (for grad x input:
  per example |instruction| + |prefix| and |history|). aux_share_sequence uses the example-level Δ of the
  instruction and of the history only. aux_share_ci95: its 95% percentile bootstrap interval over examples;
  abs_delta_per_token: the mean |Δ| per target token of the instruction, the prefix and the history (nats).
- profile_by_recency: mean Δ of a history item by its distance from the end (1 = most recent item);
  profile_by_position: the same by history index (0 = oldest item).
- profile_by_target_position: mean per-token Δ of the instruction, the prefix and the history by target
  token index t (0 = the response's first token), the per-token view of (d).
- counterfactual: the same model re-scored with the history removed (rendered empty) or shuffled. Metrics:
  mean target log-prob per token, and the rank (0 = best) of the target title among the target and
  `num_negatives` catalogue titles sampled per example, by the sum of their log-probs (as the beam search
  ranks with length_penalty 0); hr@1 and mrr over those ranks. A model that ignores the history loses little.

Two models on the same examples: `compare(a_dir, b_dir)` gives the difference of their aux shares and of their
per-token |Δ| by segment, with paired bootstrap intervals (the same resampled examples for both models).

Output, the Attribution artifact: attributions.parquet (example_id int64, segment string, position int32,
score float32; position = history index, target token index, or -1 for whole segments), summary.json,
plots/*.png, manifest.json.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gdrt_core.config import DTYPES, check_config, device_problem, field, to_dict
from gdrt_core.errors import GdrtError
from gdrt_core.metrics import bootstrap_interval

METHODS = ("ablation", "grad_x_input")
BASELINES = ("neutral", "attention")
SUMMARY_FILE = "summary.json"
ATTRIBUTIONS_FILE = "attributions.parquet"
TOKEN_SEGMENTS = ("instruction_token", "prefix_token", "history_token")  # the rows read_example_sums adds up


@dataclass
class AttributeConfig:
    dataset: str = field(path=True, help="Dataset artifact directory")
    model: str = field(path=True, help="model dir or hub id to diagnose")
    out: str = field(path=True, help="output Attribution directory")
    split: str = field("test", choices=("train", "valid", "test"), help="split to attribute: train | valid | test")
    limit: int | None = field(None, ge=1, help="attribute at most this many examples (None = the whole split)")
    method: str = field("ablation", choices=METHODS, help="ablation (feature ablation, default) | grad_x_input")
    baseline: str = field(
        "neutral", choices=BASELINES,
        help="ablation baseline: neutral (replace by a neutral token) | attention (hide from attention)",
    )
    neutral_token: str | None = field(
        None, help="token that replaces ablated tokens (default: the tokenizer's pad token)"
    )
    counterfactual: bool = field(True, help="also re-score with the history removed and shuffled")
    num_negatives: int = field(
        9, ge=0, help="catalogue titles sampled per example to rank the target against (0 = no ranking)"
    )
    seed: int = field(0, ge=0, le=2**32 - 1, help="seed for the negatives and the shuffled histories")
    groups: str | None = field(
        None, path=True, help="Groups artifact: draw its relevance histogram with the group edges"
    )
    batch_size: int = field(16, ge=1, help="sequences per forward pass")
    max_batch_tokens: int | None = field(None, ge=1, help="cap on padded tokens per forward pass (None = no cap)")
    chunk_size: int = field(256, ge=1, help="examples scored together (bounds memory; one progress step each)")
    device: str = field("auto", check=device_problem, help="auto | cpu | cuda | cuda:N")
    dtype: str = field("auto", choices=DTYPES, help="auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16")
    progress: bool = field(True, help="show a progress bar")


@dataclass
class ExampleAttribution:
    """Attribution of one example. Per-token arrays have one value per target token."""

    example_id: int
    logprobs: np.ndarray  # [n_target] log p(y_t | full prompt, y_<t)
    instruction: np.ndarray  # [n_target] Δ log p(y_t) when the instruction is ablated
    history: np.ndarray  # [n_target] Δ when the whole history is ablated
    items: list[np.ndarray]  # [n_items] x [n_target] Δ when history item i is ablated
    prefix: np.ndarray  # [n_target] Δ when y_<t is ablated (0 for t = 0)

    def rows(self) -> list[tuple[str, int, float]]:
        """(segment, position, score) rows for attributions.parquet."""
        out = [
            ("instruction", -1, float(self.instruction.sum())),
            ("history", -1, float(self.history.sum())),
            ("prefix", -1, float(self.prefix.sum())),
        ]
        out += [("history_item", i, float(d.sum())) for i, d in enumerate(self.items)]
        for name, per_token in (
            ("target_logprob", self.logprobs),
            ("instruction_token", self.instruction),
            ("history_token", self.history),
            ("prefix_token", self.prefix),
        ):
            out += [(name, t, float(v)) for t, v in enumerate(per_token)]
        return out


# ------------------------------------------------------------------------------------------- ablation


def neutral_token_id(tokenizer, neutral_token: str | None = None) -> int:
    """The id that replaces ablated tokens: `neutral_token` (must be one token) or the pad token."""
    from gdrt_core.scoring import pad_id_of

    if neutral_token is None:
        return pad_id_of(tokenizer)
    vocab = tokenizer.get_vocab()
    if neutral_token in vocab:
        return int(vocab[neutral_token])
    ids = tokenizer(neutral_token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise GdrtError(
            f"neutral_token {neutral_token!r} is {len(ids)} tokens for this tokenizer, not one",
            hint="choose a single-token string, or leave neutral_token unset to use the pad token",
        )
    return int(ids[0])


def segment_indices(example, bos_token_id: int | None = None) -> dict:
    """Token indices of each ablatable segment of a TokenizedExample.

    {"instruction": [...], "history": [...], "items": [[...] per history position], "prefix": [...]}.
    A leading BOS is never ablated (models use it as an attention sink; removing it measures that, not the
    instruction). The prefix = the target tokens used as inputs (all but the last).
    """
    from gdrt_core.tokenization import HISTORY, INSTRUCTION, TARGET

    roles = example.role
    start = (
        1 if bos_token_id is not None and example.input_ids and example.input_ids[0] == bos_token_id else 0
    )
    instruction = [i for i in range(start, len(roles)) if roles[i] == INSTRUCTION]
    history = [i for i, r in enumerate(roles) if r == HISTORY]
    num_items = max(example.history_pos) + 1 if history else 0
    items = [[i for i in history if example.history_pos[i] == k] for k in range(num_items)]
    targets = [i for i, r in enumerate(roles) if r == TARGET]
    return {"instruction": instruction, "history": history, "items": items, "prefix": targets[:-1]}


def ablation_requests(example, *, baseline: str, neutral_id: int, bos_token_id: int | None = None) -> list:
    """The scoring requests of one example: [full, instruction, history, prefix, item 0, item 1, ...]."""
    from gdrt_core.scoring import ScoringRequest, replace_tokens
    from gdrt_core.tokenization import TARGET

    if baseline not in BASELINES:
        raise GdrtError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    ids = example.input_ids
    labels = [t for t, r in zip(ids, example.role, strict=True) if r == TARGET]
    n = len(labels)
    if n == 0:
        raise GdrtError(
            "an example has no target tokens to attribute", hint="render it with its target title"
        )
    seg = segment_indices(example, bos_token_id)

    def ablated(indices: list[int]) -> ScoringRequest:
        if baseline == "attention":
            return ScoringRequest(list(ids), n, hidden=list(indices), labels=labels)
        return ScoringRequest(replace_tokens(ids, indices, neutral_id), n, labels=labels)

    prefix = ScoringRequest(
        replace_tokens(ids, seg["prefix"], neutral_id),
        n,
        labels=labels,
        hidden=list(seg["prefix"]) if baseline == "attention" else [],
    )
    return [
        ScoringRequest(list(ids), n, labels=labels),
        ablated(seg["instruction"]),
        ablated(seg["history"]),
        prefix,
        *(ablated(item) for item in seg["items"]),
    ]


def ablation_attributions(
    model,
    examples: Sequence,
    example_ids: Sequence[int],
    *,
    baseline: str,
    neutral_id: int,
    pad_token_id: int,
    bos_token_id: int | None = None,
    batch_size: int = 16,
    max_batch_tokens: int | None = None,
) -> list[ExampleAttribution]:
    """Feature-ablation attribution of TokenizedExamples, all passes batched together by length."""
    from gdrt_core.scoring import target_logprobs

    requests, spans = [], []
    for ex in examples:
        reqs = ablation_requests(ex, baseline=baseline, neutral_id=neutral_id, bos_token_id=bos_token_id)
        spans.append((len(requests), len(reqs)))
        requests.extend(reqs)
    logprobs = target_logprobs(
        model, requests, pad_token_id=pad_token_id, batch_size=batch_size, max_batch_tokens=max_batch_tokens
    )
    out = []
    for eid, (start, count) in zip(example_ids, spans, strict=True):
        full, instr, hist, prefix, *items = logprobs[start : start + count]
        out.append(
            ExampleAttribution(
                example_id=int(eid),
                logprobs=full,
                instruction=full - instr,
                history=full - hist,
                items=[full - it for it in items],
                prefix=full - prefix,
            )
        )
    return out


# ------------------------------------------------------------------------------------------- gradient x input


def grad_x_input_attributions(
    model,
    examples: Sequence,
    example_ids: Sequence[int],
    *,
    pad_token_id: int,
    bos_token_id: int | None = None,
    batch_size: int = 16,
) -> list[ExampleAttribution]:
    """Gradient x input of s (sum of target log-probs) w.r.t. the input embeddings, summed per segment.

    Segment sums go into the first target position of the per-token arrays (there is no per-token split).
    """
    import torch

    from gdrt_core.collate import length_batches
    from gdrt_core.scoring import ScoringRequest, build_batch
    from gdrt_core.tokenization import TARGET

    embed = model.get_input_embeddings()
    device = embed.weight.device
    dtype = embed.weight.dtype
    results: list[ExampleAttribution | None] = [None] * len(examples)
    requests = [ScoringRequest(ex.input_ids, sum(1 for r in ex.role if r == TARGET)) for ex in examples]
    for batch in length_batches([len(r.input_ids) for r in requests], batch_size):
        reqs = [requests[i] for i in batch]
        input_ids, mask, position_ids = build_batch(reqs, pad_token_id, dtype)
        input_ids = input_ids.to(device)
        keep = max(r.num_scored for r in reqs) + 1
        with torch.enable_grad():
            embeds = embed(input_ids).detach().requires_grad_(True)  # [batch, seq, hidden]
            out = model(
                inputs_embeds=embeds,
                attention_mask=mask.to(device),
                position_ids=position_ids.to(device),
                logits_to_keep=keep,
            )
            logprobs = torch.log_softmax(out.logits[:, -keep:].float(), dim=-1)  # [batch, keep, vocab]
            targets = input_ids[:, -(keep - 1) :]  # [batch, keep-1]
            token_lp = logprobs[:, :-1].gather(-1, targets[..., None])[..., 0]  # [batch, keep-1]
            scored = torch.zeros_like(token_lp, dtype=torch.bool)
            for row, r in enumerate(reqs):
                scored[row, keep - 1 - r.num_scored :] = True
            total = token_lp[scored].sum()
            (grad,) = torch.autograd.grad(total, embeds)
        per_token = (grad.float() * embeds.detach().float()).sum(-1).cpu().numpy()  # [batch, seq]
        token_lp = token_lp.detach().cpu().numpy()
        length = input_ids.shape[1]
        for row, i in enumerate(batch):
            ex, r = examples[i], reqs[row]
            attr = per_token[row, length - len(ex.input_ids) :]  # unpadded [seq_i]
            seg = segment_indices(ex, bos_token_id)
            n = r.num_scored

            def at_first(value: float, n: int = n) -> np.ndarray:
                arr = np.zeros(n, dtype=np.float32)
                arr[0] = value
                return arr

            results[i] = ExampleAttribution(
                example_id=int(example_ids[i]),
                logprobs=token_lp[row, token_lp.shape[1] - n :].astype(np.float32),
                instruction=at_first(attr[seg["instruction"]].sum()),
                history=at_first(attr[seg["history"]].sum()),
                items=[at_first(attr[item].sum()) for item in seg["items"]],
                prefix=at_first(attr[seg["prefix"]].sum()),
            )
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------- summaries


def example_sums(attributions: Sequence[ExampleAttribution]) -> dict[str, np.ndarray]:
    """Per example [n_examples]: the sums over its target tokens of |Δ instruction_token|, |Δ prefix_token|
    and |Δ history_token| (nats), and its number of target tokens: the terms of aux_share."""
    return {
        "instruction": np.array([np.abs(a.instruction.astype(np.float64)).sum() for a in attributions]),
        "prefix": np.array([np.abs(a.prefix.astype(np.float64)).sum() for a in attributions]),
        "history": np.array([np.abs(a.history.astype(np.float64)).sum() for a in attributions]),
        "tokens": np.array([a.instruction.size for a in attributions], dtype=np.float64),
    }


def _share(sums: dict[str, np.ndarray], idx: np.ndarray) -> np.ndarray:
    """aux_share of each resample idx [r, n] of the examples."""
    aux = (sums["instruction"] + sums["prefix"])[idx].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return aux / (aux + sums["history"][idx].sum(axis=1))


def summarize(attributions: Sequence[ExampleAttribution]) -> dict:
    """Auxiliary share (with its bootstrap interval over examples), aux : interaction ratio, segment shares,
    the mean |Δ| per target token of each segment and the history-position profile."""
    if not attributions:
        raise GdrtError("no examples were attributed", hint="check --split and --limit")
    cat = np.concatenate
    sums = example_sums(attributions)
    instr_abs, prefix_abs = float(sums["instruction"].sum()), float(sums["prefix"].sum())
    aux_abs, hist_abs = instr_abs + prefix_abs, float(sums["history"].sum())
    total = aux_abs + hist_abs
    n_tokens = int(sums["tokens"].sum())
    seq_instr = float(sum(abs(a.instruction.sum()) for a in attributions))
    seq_hist = float(sum(abs(a.history.sum()) for a in attributions))
    by_position: dict[int, list[float]] = {}
    by_recency: dict[int, list[float]] = {}
    for a in attributions:
        for i, d in enumerate(a.items):
            by_position.setdefault(i, []).append(float(d.sum()))
            by_recency.setdefault(len(a.items) - i, []).append(float(d.sum()))

    def ratio(x: float, y: float) -> float | None:
        return x / y if y > 0 else None

    return {
        "n_examples": len(attributions),
        "n_target_tokens": n_tokens,
        "mean_target_logprob": float(cat([a.logprobs for a in attributions]).mean()),
        "mean_sequence_logprob": float(np.mean([a.logprobs.sum() for a in attributions])),
        "aux_share": ratio(aux_abs, total),
        "aux_share_ci95": bootstrap_interval(lambda idx: _share(sums, idx), len(attributions)),
        "abs_delta_per_token": {segment: float(sums[segment].sum() / max(n_tokens, 1))
                                for segment in ("instruction", "prefix", "history")},
        "aux_interaction_ratio": ratio(aux_abs, hist_abs),
        "aux_share_sequence": ratio(seq_instr, seq_instr + seq_hist),
        "share_by_segment": {
            "instruction": ratio(instr_abs, total),
            "prefix": ratio(prefix_abs, total),
            "history": ratio(hist_abs, total),
        },
        "mean_delta": {
            "instruction": float(np.mean([a.instruction.sum() for a in attributions])),
            "history": float(np.mean([a.history.sum() for a in attributions])),
            "prefix": float(np.mean([a.prefix.sum() for a in attributions])),
            "history_item": float(np.mean([v for vs in by_position.values() for v in vs]))
            if by_position
            else None,
        },
        "profile_by_position": {str(k): float(np.mean(v)) for k, v in sorted(by_position.items())},
        "profile_by_recency": {str(k): float(np.mean(v)) for k, v in sorted(by_recency.items())},
        "profile_counts": {str(k): len(v) for k, v in sorted(by_recency.items())},
        "profile_by_target_position": _target_position_profile(attributions),
    }


def read_example_sums(attribution_dir: str | Path) -> dict:
    """`example_sums` of an Attribution artifact, from its attributions.parquet, plus "example_id"
    [n_examples] (sorted) and "scores" (the method and baseline that made them, from the manifest's config).
    Errors name the directory (not an Attribution artifact, a changed file)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gdrt_core.artifacts import read_manifest, read_table

    manifest = read_manifest(attribution_dir, "attribution")  # checks the kind and the files' hashes
    path = Path(attribution_dir) / ATTRIBUTIONS_FILE
    table = read_table(path, {"example_id": pa.int64(), "segment": pa.string(), "score": pa.float32()})
    table = table.filter(pc.is_in(table.column("segment"), pa.array(list(TOKEN_SEGMENTS))))
    if table.num_rows == 0:
        raise GdrtError(f"holds no token attributions (no {', '.join(TOKEN_SEGMENTS)} rows)", path=str(path),
                        hint="re-create the artifact with gdrt attribute")
    if not np.isfinite(table.column("score").to_numpy()).all():
        raise GdrtError("holds a score that is not a finite float32 (nan or inf)", path=str(path),
                        hint="re-create the artifact with gdrt attribute")
    ids = np.unique(table.column("example_id").to_numpy())
    config = manifest.get("config") or {}
    out: dict = {"example_id": ids, "scores": (config.get("method"), config.get("baseline"))}
    for segment, key in zip(TOKEN_SEGMENTS, ("instruction", "prefix", "history"), strict=True):
        rows = table.filter(pc.equal(table.column("segment"), segment))
        where = np.searchsorted(ids, rows.column("example_id").to_numpy())
        scores = np.abs(rows.column("score").to_numpy().astype(np.float64))
        out[key] = np.bincount(where, weights=scores, minlength=ids.size)
        if key == "instruction":
            out["tokens"] = np.bincount(where, minlength=ids.size).astype(np.float64)
    return out


def compare(a_dir: str | Path, b_dir: str | Path, *, resamples: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of two models' Attribution artifacts on the same examples (same dataset, split and
    limit): aux_share of each, the difference a - b with a paired percentile bootstrap interval over examples
    (the same resampled examples for both; `bootstrap_interval`), the number of examples whose own aux share
    is lower under a, and the difference in mean |Δ| per target token of each segment (nats) with its interval.
    Paired resampling removes the spread between examples, which dominates the unpaired intervals.
    A GdrtError when the two artifacts do not hold the same examples."""
    a, b = read_example_sums(a_dir), read_example_sums(b_dir)
    if a["scores"] != b["scores"]:
        raise GdrtError(f"{a_dir} and {b_dir} hold different scores (method, baseline: {a['scores']} and "
                        f"{b['scores']}): their deltas are not in the same units",
                        hint="attribute both models with the same method and baseline")
    if not np.array_equal(a["example_id"], b["example_id"]):
        raise GdrtError(f"{a_dir} and {b_dir} attribute different examples ({a['example_id'].size} and "
                        f"{b['example_id'].size}, {np.intersect1d(a['example_id'], b['example_id']).size} in both)",
                        hint="attribute both models with the same --dataset, --split and --limit")
    n = int(a["example_id"].size)

    def per_token(sums: dict, segment: str, idx: np.ndarray) -> np.ndarray:
        return sums[segment][idx].sum(axis=1) / np.maximum(sums["tokens"][idx].sum(axis=1), 1.0)

    everything = np.arange(n)[None, :]  # one "resample": all examples once
    each = np.arange(n)[:, None]  # n "resamples" of one example each: every example's own share
    share_a, share_b = float(_share(a, everything)[0]), float(_share(b, everything)[0])
    return {
        "examples": n,
        "a": {"dir": str(a_dir), "aux_share": share_a,
              "aux_share_ci95": bootstrap_interval(lambda idx: _share(a, idx), n, resamples=resamples, seed=seed)},
        "b": {"dir": str(b_dir), "aux_share": share_b,
              "aux_share_ci95": bootstrap_interval(lambda idx: _share(b, idx), n, resamples=resamples, seed=seed)},
        "aux_share_difference": share_a - share_b,
        "aux_share_difference_ci95": bootstrap_interval(lambda idx: _share(a, idx) - _share(b, idx), n,
                                                        resamples=resamples, seed=seed),
        "examples_with_lower_aux_share": int(np.sum(_share(a, each) < _share(b, each))),
        "abs_delta_per_token_difference": {
            segment: {
                "difference": float(per_token(a, segment, everything)[0] - per_token(b, segment, everything)[0]),
                "ci95": bootstrap_interval(lambda idx, s=segment: per_token(a, s, idx) - per_token(b, s, idx), n,
                                           resamples=resamples, seed=seed),
            }
            for segment in ("instruction", "prefix", "history")
        },
    }


def _target_position_profile(attributions: Sequence[ExampleAttribution]) -> dict[str, dict[str, float]]:
    """Mean per-token Δ of the instruction, the generated prefix and the history by target token index t:
    how the reliance moves from the history to the prefix as the title is written."""
    longest = max(len(a.logprobs) for a in attributions)
    out = {}
    for t in range(longest):
        rows = [a for a in attributions if len(a.logprobs) > t]
        out[str(t)] = {
            "instruction": float(np.mean([a.instruction[t] for a in rows])),
            "prefix": float(np.mean([a.prefix[t] for a in rows])),
            "history": float(np.mean([a.history[t] for a in rows])),
            "count": len(rows),
        }
    return out


# ------------------------------------------------------------------------------------------- counterfactual


def counterfactual_inputs(
    example, titles: Sequence[str], num_negatives: int, seed: int
) -> tuple[dict[str, list[str]], list[str]]:
    """({condition: history titles} for full / removed / shuffled, [target title, *sampled negatives]).

    Seeded per example, so a re-run (or another model) sees the same shuffles and negatives.
    """
    rng = np.random.default_rng([seed, int(example.example_id)])
    history = list(example.history_titles)
    shuffled = [history[i] for i in rng.permutation(len(history))]
    negatives: list[str] = []
    if num_negatives:
        for j in rng.permutation(len(titles)):
            if titles[j] != example.target_title:
                negatives.append(titles[j])
            if len(negatives) == num_negatives:
                break
    conditions = {"full": history, "history_removed": [], "history_shuffled": shuffled}
    return conditions, [example.target_title, *negatives]


def counterfactual_scores(
    model,
    tokenizer,
    domain: str,
    examples: Sequence,
    titles: Sequence[str],
    *,
    num_negatives: int,
    seed: int,
    batch_size: int = 16,
    max_batch_tokens: int | None = None,
    shared_prompt: bool | None = None,
) -> dict[str, list[tuple[float, int | None]]]:
    """{condition: [(mean target token log-prob, rank of the target among the candidates) per example]}.

    Candidates are scored as the trie sees them (tokenization.response_token_ids after the prompt). With
    `shared_prompt` (default: when the model has a KV cache) each prompt runs once and the candidate titles
    continue it; otherwise every prompt + title is a separate sequence (same numbers, more compute).
    """
    from gdrt_core.prompts import render
    from gdrt_core.scoring import (
        ScoringRequest,
        pad_id_of,
        shared_prompt_logprobs,
        supports_shared_prompt,
        target_logprobs,
    )
    from gdrt_core.tokenization import context_limit, response_token_ids, tokenize_prompt

    max_length = context_limit(model, tokenizer)
    if shared_prompt is None:
        shared_prompt = supports_shared_prompt(model)
    title_ids: dict[str, list[int]] = {}
    prompts, conts, conditions = [], [], []
    for ex in examples:
        histories, candidates = counterfactual_inputs(ex, titles, num_negatives, seed)
        for title in candidates:
            if title not in title_ids:
                title_ids[title] = response_token_ids(tokenizer, title)
        reserve = max(len(title_ids[t]) for t in candidates)
        for condition, hist in histories.items():
            prompts.append(tokenize_prompt(
                tokenizer, render(domain, hist), max_length=max_length, reserve=reserve,
                name=f"example {ex.example_id} ({condition.replace('_', ' ')})",
            ).input_ids)
            conts.append([title_ids[t] for t in candidates])
            conditions.append(condition)
    pad_id = pad_id_of(tokenizer)
    if shared_prompt:
        per_prompt = shared_prompt_logprobs(model, prompts, conts, pad_token_id=pad_id, batch_size=batch_size)
    else:
        flat = [ScoringRequest(p + c, len(c)) for p, cs in zip(prompts, conts, strict=True) for c in cs]
        lps = target_logprobs(
            model, flat, pad_token_id=pad_id, batch_size=batch_size, max_batch_tokens=max_batch_tokens
        )
        per_prompt, start = [], 0
        for cs in conts:
            per_prompt.append(lps[start : start + len(cs)])
            start += len(cs)
    out: dict[str, list] = {"full": [], "history_removed": [], "history_shuffled": []}
    for condition, (target, *negs) in zip(conditions, per_prompt, strict=True):
        s = float(target.sum())
        rank = int(sum(float(n.sum()) > s for n in negs)) if negs else None
        out[condition].append((float(target.mean()), rank))
    return out


def counterfactual_summary(scores: dict[str, list[tuple[float, int | None]]]) -> dict:
    """Metrics per condition and their drop from `full` (positive = the model needs the history)."""
    metrics = {}
    for condition, rows in scores.items():
        lp = [r[0] for r in rows]
        ranks = [r[1] for r in rows if r[1] is not None]
        m = {"mean_target_logprob": float(np.mean(lp)) if lp else None}
        if ranks:
            r = np.asarray(ranks, dtype=np.float64)
            m.update(
                {
                    "mean_rank": float(r.mean()),
                    "hr@1": float((r == 0).mean()),
                    "mrr": float((1.0 / (r + 1)).mean()),
                }
            )
        metrics[condition] = m
    drops = {}
    for condition in ("history_removed", "history_shuffled"):
        drops[condition] = {
            k: (metrics["full"][k] - v) if k != "mean_rank" else (v - metrics["full"][k])
            for k, v in metrics.get(condition, {}).items()
            if v is not None and metrics["full"].get(k) is not None
        }
    return {"metrics": metrics, "drop": drops}


# ------------------------------------------------------------------------------------------- plots


def write_plots(summary: dict, plots_dir: Path, groups: tuple[dict, Any] | None = None) -> list[str]:
    """share_by_segment.png, profile_by_position.png and, with `groups` (`grouping.read_groups`'s (info,
    token_groups table) of a Groups artifact), relevance_histogram.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []

    shares = {k: v or 0.0 for k, v in summary["share_by_segment"].items()}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(list(shares), list(shares.values()), color=["#4c72b0", "#8172b2", "#55a868"])
    ax.set_ylabel("share of |Δ log p|")
    ax.set_title(f"attribution by segment (aux share {summary['aux_share'] or 0:.2f})")
    fig.tight_layout()
    fig.savefig(plots_dir / "share_by_segment.png", dpi=100)
    plt.close(fig)
    written.append("share_by_segment.png")

    profile = summary["profile_by_recency"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([int(k) for k in profile], list(profile.values()), color="#55a868")
    ax.set_xlabel("history item, counted back from the most recent (1 = last)")
    ax.set_ylabel("mean Δ log p(target)")
    ax.set_title("attribution by history position")
    fig.tight_layout()
    fig.savefig(plots_dir / "profile_by_position.png", dpi=100)
    plt.close(fig)
    written.append("profile_by_position.png")

    if groups is not None:
        from gdrt_core.grouping import plot_relevance_histogram

        plot_relevance_histogram(*groups, plots_dir / "relevance_histogram.png")
        written.append("relevance_histogram.png")
    return written


# ------------------------------------------------------------------------------------------- the stage


def _numeric_metrics(summary: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in summary.items():
        if isinstance(v, dict):
            out.update(_numeric_metrics(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


def run(config: AttributeConfig, *, model=None, tokenizer=None, context=None) -> dict:
    """Attribute `config.split` of the dataset; write the Attribution artifact; return the summary.

    Steps: validate -> open the tracking run -> attribute the split chunk by chunk -> summarise -> write
    the artifact -> log to the run.
    """
    from gdrt_core.tracking import stage_run

    ds, examples, groups, guard = _validate(config)
    with stage_run("attribute", to_dict(config), context) as tracker:
        attributions, cf_scores = _attribute_split(config, ds, examples, model, tokenizer)
        summary = _summary(config, attributions, cf_scores)
        _write_attribution(config, guard, attributions, summary, groups)
        _track(tracker, config, summary)
    return summary


def _validate(config: AttributeConfig):
    """Checks before any work: the config, the output, the Groups artifact, the split. Returns (dataset,
    the examples to attribute, the Groups artifact as `grouping.read_groups` gives it or None, the output
    guard)."""
    from gdrt_core.artifacts import check_output
    from gdrt_core.dataset import Dataset

    check_config(config, "attribute config")
    guard = {"kind": "attribution",
             "inputs": {"dataset": config.dataset, "model": config.model, "groups": config.groups}}
    check_output(config.out, **guard)
    groups = None
    if config.groups is not None:  # read in full now, not after the attribution's work; the plots use it
        from gdrt_core.grouping import read_groups

        groups = read_groups(config.groups)
    ds = Dataset(config.dataset)
    examples = ds.examples(config.split, config.limit)
    if not examples:
        raise GdrtError(f"split {config.split!r} has no examples", path=config.dataset)
    return ds, examples, groups, guard


def _attribute_split(config: AttributeConfig, ds, examples, model, tokenizer):
    """Per-example attributions (ablation or gradient x input) and, with `counterfactual`, the target's and
    negatives' scores under the counterfactual histories; the model is loaded here unless passed in.
    Returns (attributions, {condition: scores})."""
    from tqdm.auto import tqdm

    from gdrt_core.prompts import render
    from gdrt_core.scoring import pad_id_of
    from gdrt_core.tokenization import context_limit, tokenize_example

    if model is None or tokenizer is None:
        from gdrt_core.scoring import load_scoring_model

        model, tokenizer = load_scoring_model(config.model, device=config.device, dtype=config.dtype)
    pad_id = pad_id_of(tokenizer)
    max_length = context_limit(model, tokenizer)
    neutral_id = neutral_token_id(tokenizer, config.neutral_token)
    titles = sorted(set(ds.titles.values()))
    attributions: list[ExampleAttribution] = []
    cf_scores: dict[str, list] = {"full": [], "history_removed": [], "history_shuffled": []}
    with tqdm(total=len(examples), desc=f"attribute {config.split}", unit="ex", disable=not config.progress) as bar:
        for start in range(0, len(examples), config.chunk_size):
            chunk = examples[start : start + config.chunk_size]
            tokenized = [
                tokenize_example(
                    tokenizer, render(ds.domain, list(e.history_titles), e.target_title), max_length=max_length,
                    name=f"{config.dataset}: example {e.example_id} of the {config.split} split",
                )
                for e in chunk
            ]
            ids = [e.example_id for e in chunk]
            if config.method == "ablation":
                attributions += ablation_attributions(
                    model, tokenized, ids, baseline=config.baseline, neutral_id=neutral_id, pad_token_id=pad_id,
                    bos_token_id=tokenizer.bos_token_id, batch_size=config.batch_size,
                    max_batch_tokens=config.max_batch_tokens,
                )
            else:
                attributions += grad_x_input_attributions(
                    model, tokenized, ids, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
                    batch_size=config.batch_size,
                )
            if config.counterfactual:
                for k, v in counterfactual_scores(
                    model, tokenizer, ds.domain, chunk, titles, num_negatives=config.num_negatives,
                    seed=config.seed, batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens,
                ).items():
                    cf_scores[k] += v
            bar.update(len(chunk))
    return attributions, cf_scores


def _summary(config: AttributeConfig, attributions: list[ExampleAttribution], cf_scores: dict) -> dict:
    """summary.json's content: the method, the segment shares and profiles, the counterfactual summary."""
    summary = {"method": config.method, "baseline": config.baseline, "split": config.split,
               **summarize(attributions)}
    if config.method == "grad_x_input":
        summary["note"] = "grad_x_input: per-token fields hold each segment's sum at target position 0"
    if config.counterfactual:
        summary["counterfactual"] = counterfactual_summary(cf_scores)
    return summary


def _write_attribution(config: AttributeConfig, guard: dict, attributions: list[ExampleAttribution],
                       summary: dict, groups: tuple[dict, Any] | None = None) -> None:
    """attributions.parquet (one row per example, segment and position), summary.json, the plots and the
    manifest, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import MANIFEST, atomic_output_dir, write_json_atomic, write_manifest

    eids, segments, positions, scores = [], [], [], []
    for a in attributions:
        for segment, position, score in a.rows():
            eids.append(a.example_id)
            segments.append(segment)
            positions.append(position)
            scores.append(score)
    table = pa.table({
        "example_id": pa.array(eids, pa.int64()),
        "segment": pa.array(segments, pa.string()),
        "position": pa.array(positions, pa.int32()),
        "score": pa.array(scores, pa.float32()),
    })
    inputs = {"dataset": config.dataset}
    if (Path(config.model) / MANIFEST).is_file():
        inputs["model"] = config.model
    if config.groups is not None:
        inputs["groups"] = config.groups
    with atomic_output_dir(config.out, **guard) as tmp:
        pq.write_table(table, tmp / ATTRIBUTIONS_FILE)
        write_json_atomic(tmp / SUMMARY_FILE, summary)
        write_plots(summary, tmp / "plots", groups)
        write_manifest(tmp, "attribution", config=to_dict(config), inputs=inputs)


def _track(tracker, config: AttributeConfig, summary: dict) -> None:
    """The summary's numbers (profiles left out), summary.json and the plots."""
    out = Path(config.out)
    tracker.log_metrics(_numeric_metrics({k: v for k, v in summary.items() if not k.startswith("profile")}))
    tracker.log_artifact(out / SUMMARY_FILE)
    tracker.log_artifacts(out / "plots", "plots")


def format_comparison(result: dict) -> str:
    """`compare`'s result as the lines `gdrt compare-attribution` prints."""
    def interval(ci: list | None, signed: bool = True) -> str:
        if ci is None:  # fewer than two examples, or a share undefined on some resample
            return "(no interval)"
        return f"({ci[0]:+.4f}, {ci[1]:+.4f})" if signed else f"(95% {ci[0]:.4f}-{ci[1]:.4f})"

    a, b, n = result["a"], result["b"], result["examples"]
    lines = [
        f"A {a['dir']}: auxiliary share {a['aux_share']:.4f} {interval(a['aux_share_ci95'], signed=False)}",
        f"B {b['dir']}: auxiliary share {b['aux_share']:.4f} {interval(b['aux_share_ci95'], signed=False)}",
        f"A - B on the same {n} examples: {result['aux_share_difference']:+.4f} "
        f"{interval(result['aux_share_difference_ci95'])}, lower under A on {result['examples_with_lower_aux_share']} of {n}",
        "mean |delta| per target token, A - B (nats):",
    ]
    for segment, d in result["abs_delta_per_token_difference"].items():
        lines.append(f"  {segment:<11} {d['difference']:+.4f} {interval(d['ci95'])}")
    return "\n".join(lines)


def summary_line(config: AttributeConfig, summary: dict) -> str:
    """The one line `gdrt attribute` prints."""
    share, ratio = summary["aux_share"], summary["aux_interaction_ratio"]
    return (
        f"attributed {summary['n_examples']} {config.split} examples -> {config.out}: auxiliary share "
        f"{share if share is None else round(share, 3)}, aux:interaction {ratio if ratio is None else round(ratio, 2)}:1"
    )
