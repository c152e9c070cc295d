"""Training data and the per-step weights of the GDRT objective.

- `build_features`: tokenise a split with the one prompt (`prompts.render` + `tokenize_example`) and join
  the Groups artifact's group id onto every target token by (example_id, position among the target tokens).
- `TrainCollator`: `collate.Collator` set for the Trainer (right padding; group id -1 on every non-target
  token; the columns compute_loss reads).
- `StepWeights`: the weights policy. The GDRT gradient is sum_g w_g grad L_g; with w fixed for an
  optimiser step, every target token i carries the weight w_g(i) / N_g(i), N_g counted over the WHOLE
  optimiser batch (all micro-batches, all ranks). That is linear in the tokens, so the micro-batch losses
  add up to the full-batch objective's gradient whatever the split. `batch` computes w from the current
  optimiser batch's group losses (a no-grad look-ahead when the batch is split), `lagged` from the previous
  step's (optionally smoothed by an EMA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gdrt_core.collate import NO_GROUP, Collator
from gdrt_core.errors import GdrtError

TRAIN_COLUMNS = ("input_ids", "attention_mask", "labels", "group_ids")  # what GdrtTrainer.compute_loss reads


# ---------------------------------------------------------------- features


def load_token_groups(groups_dir: str | Path, split: str = "train") -> tuple[dict[tuple[int, int], tuple[int, int]], int]:
    """{(example_id, position): (token_id, group)} of `split`'s target tokens, and the number of groups G.

    Read with `grouping.read_groups`: a GdrtError naming the file when the Groups artifact is not what
    `gdrt group` writes.
    """
    import pyarrow.compute as pc

    from gdrt_core.grouping import read_groups

    info, table = read_groups(groups_dir)
    table = table.filter(pc.equal(table.column("split"), split))
    cols = [table.column(c).to_pylist() for c in ("example_id", "position", "token_id", "group")]
    lookup = {(e, p): (t, g) for e, p, t, g in zip(*cols, strict=True)}
    if len(lookup) != table.num_rows:
        raise GdrtError(f"{table.num_rows - len(lookup)} {split} target tokens have more than one row "
                        "(the same example_id and position)", path=str(Path(groups_dir) / "token_groups.parquet"),
                        hint="re-create the artifact with `gdrt group`")
    return lookup, info["num_groups"]


def groups_dataset_sha256(groups_dir: str | Path) -> str | None:
    """The manifest sha256 of the Dataset a Groups artifact was built on (None if it does not say)."""
    from gdrt_core.artifacts import read_manifest

    inputs = read_manifest(groups_dir, "groups", verify=False).get("inputs", {})
    return (inputs.get("dataset") or {}).get("manifest_sha256")


def _groups_mismatch(dataset: Any, groups_path: str, groups_dataset: str | None, problem: str, cause: str) -> GdrtError:
    """The error for groups that do not fit this dataset's tokens, blaming the dataset when the Groups
    artifact records another Dataset manifest, else `cause` (what else explains `problem`)."""
    from gdrt_core.artifacts import manifest_hash

    this = manifest_hash(dataset.root)
    if groups_dataset is not None and groups_dataset != this:
        return GdrtError(
            f"{problem}: the Groups artifact was built on another Dataset (its manifest sha256 {groups_dataset[:12]}, "
            f"this dataset's {this[:12]}; e.g. another curation of the same source)", path=groups_path,
            hint=f"rebuild the groups from this dataset: gdrt group --dataset {dataset.root} ...",
        )
    return GdrtError(f"{problem}", path=groups_path, hint=cause)


def build_features(
    dataset: Any,
    split: str,
    tokenizer: Any,
    *,
    token_groups: dict[tuple[int, int], tuple[int, int]] | None = None,
    limit: int | None = None,
    groups_path: str = "<groups>",
    groups_dataset: str | None = None,
    max_length: int | None = None,
) -> list[dict[str, Any]]:
    """One dict per example: input_ids, attention_mask, labels, group_ids (per token), example_id.

    Without `token_groups` every target token is in group 0 (the SFT objective). With them, a target
    token whose (example_id, position) is missing, or whose token id differs from the one the Groups
    artifact recorded, is an error: the groups were built on another dataset (when `groups_dataset`, the
    Dataset manifest sha256 the Groups artifact records, differs from this dataset's) or tokenizer.
    An example longer than `max_length` (the model's context) is an error.
    """
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import IGNORE_INDEX, tokenize_example

    features = []
    for ex in dataset.examples(split, limit):
        tok = tokenize_example(
            tokenizer, render(dataset.domain, list(ex.history_titles), ex.target_title), max_length=max_length,
            name=f"{dataset.root}: example {ex.example_id} of the {split} split",
        )
        group_ids = [NO_GROUP] * len(tok.input_ids)
        position = 0
        for i, label in enumerate(tok.labels):
            if label == IGNORE_INDEX:
                continue
            if token_groups is None:
                group_ids[i] = 0
            else:
                key = (ex.example_id, position)
                if key not in token_groups:
                    raise _groups_mismatch(
                        dataset, groups_path, groups_dataset,
                        f"example {ex.example_id}, target token {position}: no group in token_groups.parquet",
                        "rebuild the Groups artifact from this dataset (gdrt group)",
                    )
                token_id, group = token_groups[key]
                if token_id != label:
                    raise _groups_mismatch(
                        dataset, groups_path, groups_dataset,
                        f"example {ex.example_id}, target token {position}: token id {label} but the Groups "
                        f"artifact has {token_id}",
                        "the groups were built with another tokenizer; rebuild them with this model's",
                    )
                group_ids[i] = int(group)
            position += 1
        features.append({
            "input_ids": tok.input_ids, "attention_mask": tok.attention_mask, "labels": tok.labels,
            "group_ids": group_ids, "example_id": ex.example_id,
        })
    return features


@dataclass
class TrainCollator(Collator):
    """The Trainer's collator: `Collator(pad_token_id)` with right padding, labels -100 and group id -1 on
    padding, and only the columns compute_loss reads (a dataclass: DataLoader workers can pickle it)."""

    columns: tuple[str, ...] = TRAIN_COLUMNS
    return_example_id: bool = False


def pad_batch(features: list[dict[str, Any]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a list of features into tensors [batch, seq] (`TrainCollator` applied once)."""
    return TrainCollator(pad_token_id)(features)


# ---------------------------------------------------------------- per-token maths


def shifted(logits: Any, labels: Any, group_ids: Any) -> tuple[Any, Any, Any]:
    """Align a causal LM's predictions with the next token: logits[:, :-1] predict labels[:, 1:].

    logits [batch, seq, vocab] -> [batch, seq-1, vocab]; labels, group_ids [batch, seq] -> [batch, seq-1].
    """
    return logits[:, :-1, :], labels[:, 1:], group_ids[:, 1:]


# ---------------------------------------------------------------- weights policy


class StepWeights:
    """Chooses w once per optimiser step (policy `batch` or `lagged`, optional EMA of the group losses).

    `batch`: w = dro_weights of the current optimiser batch's group losses (EMA-smoothed if ema > 0).
    `lagged`: w = dro_weights of the losses up to the previous step (no look-ahead). `sft`: every token
    weighs 1 / N (the token mean over the whole optimiser batch). State to keep across a resume:
    `state_dict()`.
    """

    def __init__(self, num_groups: int, *, objective: str = "gdrt", tau: float = 1.0, prior: str = "uniform",
                 policy: str = "batch", ema: float = 0.0):
        from gdrt_core.loss import PRIORS, GroupLossEMA

        if objective not in ("sft", "gdrt"):
            raise GdrtError(f"objective {objective!r} is unknown", hint="use sft or gdrt")
        if policy not in ("batch", "lagged"):
            raise GdrtError(f"weights policy {policy!r} is unknown", hint="use batch or lagged")
        if prior not in PRIORS:
            raise GdrtError(f"prior {prior!r} is unknown", hint=f"use one of {', '.join(PRIORS)}")
        self.num_groups = num_groups
        self.objective = objective
        self.tau = tau
        self.prior = prior
        self.policy = policy
        self.history = GroupLossEMA(num_groups, ema)

    @property
    def needs_lookahead(self) -> bool:
        """Whether w depends on the current batch's losses (then a split batch needs a look-ahead)."""
        return self.objective == "gdrt" and self.policy == "batch"

    def weights(self, counts: Any, current_losses: Any | None) -> Any:
        """w [groups] for this step from the whole batch's counts N_g (and its L_g for `batch`)."""
        import torch

        from gdrt_core.loss import dro_weights

        if self.objective == "sft":
            return (counts > 0).to(torch.float64)
        if self.policy == "batch":
            if current_losses is None:
                raise ValueError("the batch policy needs the current group losses")
            basis = self.history.update(current_losses, counts)
        else:
            basis = self.history.losses_for_weights()
        return dro_weights(basis.double(), counts, self.prior, self.tau)

    def end_step(self, losses: Any, counts: Any) -> None:
        """Record the finished step's whole-batch group losses (the next step's basis for `lagged`)."""
        if self.objective == "gdrt" and self.policy == "lagged":
            self.history.update(losses, counts)

    def objective_value(self, losses: Any, counts: Any) -> float:
        """The GDRT objective tau * log sum_g pi_g exp(L_g / tau) of the step (for logging)."""
        from gdrt_core.loss import dro_objective

        return float(dro_objective(losses.double(), counts, self.prior, self.tau))

    def state_dict(self) -> dict[str, Any]:
        return {"objective": self.objective, "policy": self.policy, "tau": self.tau, "prior": self.prior,
                "history": self.history.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state["history"])
