"""The grouping stage (method.md §4): group target tokens by how predictable they are without the history.

For every target token y_t of every example of the train (and valid) split:

    r_t = log p_ref(y_t | instruction tokens, y_<t)      with the user history removed

- `drop` (default): the prompt is rendered with an empty history list and the target tokenised after it.
  The target's token ids must be those of the full example (the trainer joins on (example_id, position));
  a tokenizer for which they differ is an error.
- `mask`: the full example is kept, positions unchanged, and its history tokens are removed from attention.

G quantile bins are fitted on the train scores (per token, or per example = mean r over its target tokens)
and applied unchanged to every split; group 0 holds the lowest r (least predictable from auxiliary tokens).
A score equal to an edge, or within `tie_tolerance` nats below it, goes to the upper group (method.md §4).
With per-example grouping every token of an example gets the example's group, and the `relevance` column
still holds each token's own r_t (the binned value is the mean of the example's rows).

Output, the Groups artifact: token_groups.parquet (example_id int64, position int32 = index of the token
among the example's target tokens, token_id int32, relevance float32 = r_t, group int8, split string),
groups.json (edges = the G-1 cut points, sizes and mean relevance per group and split),
plots/relevance_histogram.png (train relevance with the edges), manifest.json.

Resumable: scores are written in parts of `part_size` examples to a work directory next to the output
(`<out>.parts` by default); a re-run with the same inputs and settings skips the finished parts. The work
directory is removed once the artifact is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gdrt_core.config import DTYPES, check_config, device_problem, field, to_dict
from gdrt_core.errors import GdrtError

GROUPS_FILE = "groups.json"
TOKEN_GROUPS_FILE = "token_groups.parquet"
HISTOGRAM_FILE = "relevance_histogram.png"
STATE_FILE = "state.json"
REMOVALS = ("drop", "mask")
GRANULARITIES = ("token", "example")
SPLITS = ("train", "valid", "test")
MAX_GROUPS = 128  # group ids are stored as int8 (0..127)
# Scores of one token in one context can differ from window to window in their 6th-7th significant digit
# (batched float32 forward passes; about 1e-5 nats for |r| ~ 1); 1e-4 nats covers that with margin. It is sized
# for float32 scoring: in bfloat16 the same scores spread over 0.1-0.2 nats, which no tolerance should absorb.
TIE_TOLERANCE = 1e-4


@dataclass
class GroupConfig:
    dataset: str = field(path=True, help="Dataset artifact directory")
    reference: str = field(
        path=True, help="reference model p_ref: a model dir (the SFT model in the pipeline) or hub id"
    )
    out: str = field(path=True, help="output Groups directory")
    num_groups: int = field(4, ge=1, le=MAX_GROUPS, help=f"number of quantile groups G (group ids are int8: at most {MAX_GROUPS})")
    history_removal: str = field(
        "drop", choices=REMOVALS, help="drop: render with an empty history | mask: hide history tokens from attention"
    )
    granularity: str = field("token", choices=GRANULARITIES, help="token: bin each r_t | example: bin the mean r_t of each example")
    tie_tolerance: float = field(
        TIE_TOLERANCE, ge=0, help="nats: a score this close below an edge counts as equal to it and goes to the upper "
        "group, so near-equal scores whose last digits depend on the batch stay together (0 = exact comparison)"
    )
    splits: list[str] = field(
        ["train", "valid"], choices=SPLITS, help="splits to score (train is required: edges are fitted on it)"
    )
    limit: int | None = field(None, ge=1, help="score at most this many examples per split (quick runs)")
    batch_size: int = field(16, ge=1, help="sequences per forward pass")
    max_batch_tokens: int | None = field(None, ge=1, help="cap on padded tokens per forward pass (None = no cap)")
    part_size: int = field(1024, ge=1, help="examples per resumable part file")
    work_dir: str | None = field(
        None, path=True, help="where finished parts are kept until the stage completes (default <out>.parts)"
    )
    device: str = field("auto", check=device_problem, help="auto | cpu | cuda | cuda:N")
    dtype: str = field("auto", choices=DTYPES, help="auto (float32 on CPU, bfloat16 on GPU) | float32 | bfloat16 | float16")
    progress: bool = field(True, help="show a progress bar")

    def check(self, source: str) -> None:
        if "train" not in self.splits:
            raise GdrtError("setting splits must include train (the group edges are fitted on it)", path=source,
                            hint="e.g. splits=[train, valid]")


# ------------------------------------------------------------------------------------------- pure maths


def fit_edges(scores: np.ndarray, num_groups: int) -> np.ndarray:
    """The G-1 cut points between G equal-count bins of `scores` (linear-interpolated quantiles)."""
    if num_groups < 1:
        raise GdrtError(f"num_groups must be at least 1, got {num_groups}")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.size == 0:
        raise GdrtError("no train target tokens to fit the group edges on", hint="check the train split")
    return np.quantile(scores, np.arange(1, num_groups) / num_groups)


def assign_groups(scores: np.ndarray, edges: np.ndarray, tolerance: float = 0.0) -> np.ndarray:
    """Group id per score: the number of cut points e with e - tolerance <= score (0 = lowest r), as int8.

    scores: (N,) log-probabilities in nats; edges: (G-1,) ascending (`fit_edges`); tolerance >= 0 nats. A score
    equal to an edge, or at most `tolerance` below it, goes to the upper group (method.md §4, ties): a mass of
    near-equal scores that straddles an edge by rounding noise is kept in one group.
    """
    if not (np.isfinite(tolerance) and tolerance >= 0):
        raise GdrtError(f"the tie tolerance must be a finite number >= 0 nats, got {tolerance}")
    return np.searchsorted(
        np.asarray(edges, dtype=np.float64) - tolerance, np.asarray(scores, dtype=np.float64), side="right"
    ).astype(np.int8)


def example_means(example_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Per row, the mean score over the rows with the same example id (per-example grouping)."""
    _, inverse, counts = np.unique(example_ids, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=np.asarray(scores, dtype=np.float64))
    return (sums / counts)[inverse]


# ------------------------------------------------------------------------------------------- scoring


def history_removed_requests(
    tokenizer, domain: str, examples: Sequence, removal: str, *, max_length: int | None = None
) -> tuple[list, list[list[int]]]:
    """Scoring requests for r_t and the full example's target token ids, one per example.

    `examples` are dataset.Example (history_titles, target_title, example_id); one longer than `max_length`
    (the reference model's context) is an error.
    """
    from gdrt_core.prompts import render
    from gdrt_core.scoring import ScoringRequest
    from gdrt_core.tokenization import HISTORY, TARGET, tokenize_example

    if removal not in REMOVALS:
        raise GdrtError(f"history_removal must be one of {REMOVALS}, got {removal!r}")
    requests, target_ids = [], []
    for ex in examples:
        full = tokenize_example(tokenizer, render(domain, list(ex.history_titles), ex.target_title),
                                max_length=max_length, name=f"example {ex.example_id}")
        targets = [t for t, r in zip(full.input_ids, full.role, strict=True) if r == TARGET]
        if removal == "drop":
            empty = tokenize_example(tokenizer, render(domain, [], ex.target_title))
            dropped_targets = [t for t, r in zip(empty.input_ids, empty.role, strict=True) if r == TARGET]
            if dropped_targets != targets:
                raise GdrtError(
                    f"example {ex.example_id}: the target title {ex.target_title!r} tokenises differently when the "
                    f"history is dropped ({dropped_targets} vs {targets}), so its tokens cannot be matched to the "
                    "training tokens",
                    hint="use --set history_removal=mask (keeps the full prompt and hides the history instead)",
                )
            requests.append(ScoringRequest(empty.input_ids, len(targets)))
        else:
            hidden = [i for i, r in enumerate(full.role) if r == HISTORY]
            requests.append(ScoringRequest(full.input_ids, len(targets), hidden=hidden))
        target_ids.append(targets)
    return requests, target_ids


def score_part(model, tokenizer, domain: str, examples: Sequence, config: GroupConfig, on_batch=None):
    """r_t for the target tokens of `examples`, as a pyarrow table (example_id, position, token_id, relevance)."""
    import pyarrow as pa

    from gdrt_core.scoring import pad_id_of, target_logprobs
    from gdrt_core.tokenization import context_limit

    requests, target_ids = history_removed_requests(
        tokenizer, domain, examples, config.history_removal, max_length=context_limit(model, tokenizer)
    )
    logprobs = target_logprobs(
        model,
        requests,
        pad_token_id=pad_id_of(tokenizer),
        batch_size=config.batch_size,
        max_batch_tokens=config.max_batch_tokens,
        on_batch=on_batch,
    )
    eids, positions, tokens, relevance = [], [], [], []
    for ex, ids, lp in zip(examples, target_ids, logprobs, strict=True):
        eids.extend([ex.example_id] * len(ids))
        positions.extend(range(len(ids)))
        tokens.extend(ids)
        relevance.append(lp)
    return pa.table(
        {
            "example_id": pa.array(eids, pa.int64()),
            "position": pa.array(positions, pa.int32()),
            "token_id": pa.array(tokens, pa.int32()),
            "relevance": pa.array(
                np.concatenate(relevance) if relevance else np.zeros(0, np.float32), pa.float32()
            ),
        }
    )


# ------------------------------------------------------------------------------------------- resumable parts


def _fingerprint(config: GroupConfig) -> dict:
    """What the finished parts depend on: a change in any of these starts the parts afresh."""
    from gdrt_core.artifacts import input_identity, manifest_hash

    ref = Path(config.reference)
    return {
        "dataset_manifest": manifest_hash(config.dataset),
        "reference": str(ref.absolute()) if ref.exists() else config.reference,
        "reference_content": input_identity(ref),
        "history_removal": config.history_removal,
        "limit": config.limit,
        "part_size": config.part_size,
    }


def _work_path(config: GroupConfig) -> Path:
    return Path(config.work_dir or f"{Path(config.out).absolute()}.parts")


def check_work_dir(work: Path) -> None:
    """The work directory is ours to delete: absent, empty, or holding a group run's parts (its state file)."""
    if work.exists() and not (work / STATE_FILE).is_file() and (not work.is_dir() or any(work.iterdir())):
        raise GdrtError(f"the work directory exists and is not a `gdrt group` work directory (no {STATE_FILE}): "
                        "it would be deleted", path=str(work), hint="choose another work_dir, or remove it yourself")


def _open_work_dir(config: GroupConfig) -> Path:
    import json

    from gdrt_core.artifacts import write_json_atomic

    work = _work_path(config)
    fingerprint = json.loads(json.dumps(_fingerprint(config)))
    state = work / STATE_FILE
    if work.exists():
        check_work_dir(work)
        try:
            previous = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            previous = None
        if previous != fingerprint:
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not state.exists():
        write_json_atomic(state, fingerprint)
    return work


def _write_table_atomic(table, path: Path) -> None:
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import atomic_file

    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)


def _score_split(model, tokenizer, ds, split: str, config: GroupConfig, work: Path, bar) -> list[Path]:
    examples = ds.examples(split, config.limit)
    paths = []
    for index, start in enumerate(range(0, len(examples), config.part_size)):
        chunk = examples[start : start + config.part_size]
        path = work / f"{split}-{index:05d}.parquet"
        if path.exists():
            bar.update(len(chunk))
        else:
            table = score_part(model, tokenizer, ds.domain, chunk, config, on_batch=bar.update)
            _write_table_atomic(table, path)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------- the stage


def _group_stats(
    relevance: np.ndarray, groups: np.ndarray, num_groups: int
) -> tuple[list[int], list[float | None]]:
    sizes = np.bincount(groups.astype(np.int64), minlength=num_groups)[:num_groups]
    means = [float(relevance[groups == g].mean()) if sizes[g] else None for g in range(num_groups)]
    return [int(s) for s in sizes], means


def run(config: GroupConfig, *, model=None, tokenizer=None, context=None) -> dict:
    """Score, bin and write the Groups artifact; returns groups.json's content.

    `model` / `tokenizer` may be passed in (tests, notebooks); otherwise `config.reference` is loaded.
    Steps: validate -> open the tracking run -> score r_t per split (resumable parts) -> fit the edges on
    train and bin every split -> write the artifact -> log to the run.
    """
    from gdrt_core.artifacts import exclusive
    from gdrt_core.tracking import stage_run

    ds, guard = _validate(config)
    with stage_run("group", to_dict(config), context) as tracker, contextlib.ExitStack() as hold:
        hold.enter_context(exclusive(_work_path(config), "gdrt group"))
        work, tables = _score_splits(config, ds, model, tokenizer)
        token_groups, summary = _bin_splits(config, tables)
        _write_groups(config, guard, token_groups, summary)
        shutil.rmtree(work, ignore_errors=True)
        _track(tracker, config, summary)
    return summary


def _validate(config: GroupConfig):
    """Checks before any work: the config, the output and work directories, the train split. Returns
    (dataset, the output guard)."""
    from gdrt_core.artifacts import check_not_input, check_output
    from gdrt_core.dataset import Dataset

    check_config(config, "group config")
    guard = {"kind": "groups", "inputs": {"dataset": config.dataset, "reference": config.reference}}
    check_output(config.out, **guard)
    check_not_input(_work_path(config), guard["inputs"])
    check_work_dir(_work_path(config))
    ds = Dataset(config.dataset)
    ds.require_examples("train", "to fit the group edges on")
    return ds, guard


def _score_splits(config: GroupConfig, ds, model, tokenizer):
    """r_t of every target token of every split, scored part by part into the work directory (a rerun
    resumes). Returns (the work directory, {split: table of example_id, position, token_id, relevance})."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    if model is None or tokenizer is None:
        from gdrt_core.scoring import load_scoring_model

        model, tokenizer = load_scoring_model(config.reference, device=config.device, dtype=config.dtype)
    work = _open_work_dir(config)
    total = sum(min(ds.split(s).num_rows, config.limit or 1 << 62) for s in config.splits)
    with tqdm(total=total, desc="group: r_t", unit="ex", disable=not config.progress) as bar:
        parts = {s: _score_split(model, tokenizer, ds, s, config, work, bar) for s in config.splits}
    return work, {s: pa.concat_tables([pq.read_table(p) for p in paths]) for s, paths in parts.items() if paths}


def _bin_splits(config: GroupConfig, tables: dict):
    """Edges fitted on train (per token, or per example mean), every split binned with them. Returns (the
    token_groups table with its group and split columns, groups.json's content)."""
    import pyarrow as pa

    binned: dict[str, np.ndarray] = {}
    for s, t in tables.items():
        rel, example_ids = t.column("relevance").to_numpy(), t.column("example_id").to_numpy()
        bad = np.isnan(rel)
        if bad.any():
            ids = np.unique(example_ids[bad])
            raise GdrtError(f"{int(bad.sum())} {s} target token score(s) are NaN (examples {ids[:5].tolist()}"
                            f"{' ...' if len(ids) > 5 else ''}): the reference model's log-probabilities are not numbers",
                            hint="check the reference model (its weights, or a float16 overflow: --set dtype=float32)")
        binned[s] = example_means(example_ids, rel) if config.granularity == "example" else rel
    fit_values = binned["train"]
    if config.granularity == "example":  # one value per example: the mean r of its target tokens
        _, first = np.unique(tables["train"].column("example_id").to_numpy(), return_index=True)
        fit_values = fit_values[first]
    edges = fit_edges(fit_values, config.num_groups)

    out_tables, sizes, means = [], {}, {}
    for s, t in tables.items():
        groups = assign_groups(binned[s], edges, config.tie_tolerance)
        sizes[s], means[s] = _group_stats(t.column("relevance").to_numpy(), groups, config.num_groups)
        out_tables.append(
            t.append_column("group", pa.array(groups, pa.int8())).append_column(
                "split", pa.array([s] * t.num_rows, pa.string())
            )
        )
    train_rel = tables["train"].column("relevance").to_numpy()
    summary = {
        "num_groups": config.num_groups,
        "granularity": config.granularity,
        "history_removal": config.history_removal,
        "edges": [float(e) for e in edges],
        "tie_tolerance": config.tie_tolerance,
        "train_range": [float(train_rel.min()), float(train_rel.max())],
        "sizes": sizes,
        "mean_relevance": means,
        "examples": {s: int(len(np.unique(t.column("example_id").to_numpy()))) for s, t in tables.items()},
        "tokens": {s: int(t.num_rows) for s, t in tables.items()},
    }
    return pa.concat_tables(out_tables), summary


def _write_groups(config: GroupConfig, guard: dict, token_groups, summary: dict) -> None:
    """token_groups.parquet, groups.json, the relevance histogram and the manifest, atomically."""
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import MANIFEST, atomic_output_dir, write_json_atomic, write_manifest

    inputs = {"dataset": config.dataset}
    if (Path(config.reference) / MANIFEST).is_file():
        inputs["reference"] = config.reference
    with atomic_output_dir(config.out, **guard) as tmp:
        pq.write_table(token_groups, tmp / TOKEN_GROUPS_FILE)
        write_json_atomic(tmp / GROUPS_FILE, summary)
        (tmp / "plots").mkdir()
        plot_relevance_histogram(summary, token_groups, tmp / "plots" / HISTOGRAM_FILE)
        write_manifest(tmp, "groups", config=to_dict(config), inputs=inputs, groups=summary)


def _track(tracker, config: GroupConfig, summary: dict) -> None:
    """The edges, group sizes and mean relevance per split, groups.json and the histogram."""
    metrics = {"edge_" + str(i): e for i, e in enumerate(summary["edges"])}
    for s, sizes in summary["sizes"].items():
        metrics.update({f"{s}_size_g{g}": n for g, n in enumerate(sizes)})
        metrics.update({f"{s}_mean_relevance_g{g}": m for g, m in enumerate(summary["mean_relevance"][s])
                        if m is not None})
    tracker.log_metrics(metrics)
    tracker.log_artifact(Path(config.out) / GROUPS_FILE)
    tracker.log_artifact(Path(config.out) / "plots" / HISTOGRAM_FILE, "plots")


def plot_relevance_histogram(info: dict, table, path: str | os.PathLike) -> None:
    """Histogram of the train relevance (per token, or per example mean) with the group edges, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = table.column("split").to_numpy(zero_copy_only=False)
    train = table.filter(split == "train")
    rel = train.column("relevance").to_numpy()
    per_example = info.get("granularity") == "example"
    if per_example:
        _, first = np.unique(train.column("example_id").to_numpy(), return_index=True)
        rel = example_means(train.column("example_id").to_numpy(), rel)[first]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(rel, bins=50, color="#4c72b0")
    for edge in info["edges"]:
        ax.axvline(edge, color="#c44e52", linestyle="--")
    ax.set_xlabel("relevance r_t = log p_ref(y_t | no history)" + (", example mean" if per_example else ""))
    ax.set_ylabel("train examples" if per_example else "train target tokens")
    ax.set_title(f"relevance with the {info['num_groups']} group edges")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def token_groups_columns() -> dict:
    """The columns of token_groups.parquet and their pyarrow types (the module docstring says what they hold)."""
    import pyarrow as pa

    return {"example_id": pa.int64(), "position": pa.int32(), "token_id": pa.int32(), "relevance": pa.float32(),
            "group": pa.int8(), "split": pa.string()}


def read_groups(root: str | os.PathLike) -> tuple[dict, object]:
    """(groups.json, token_groups table) of a Groups artifact, checked against its manifest.

    The table has exactly the columns of `token_groups_columns()`, and groups.json a `num_groups` (from its
    `edges` in artifacts that predate it). Raises GdrtError naming the file when either does not hold what the
    grouping stage writes: a missing column or key, a value of another type, a group id outside 0..G-1.
    """
    import json

    import pyarrow.compute as pc

    from gdrt_core.artifacts import read_manifest, read_table

    read_manifest(root, "groups")
    root = Path(root)
    remake = "re-create the artifact with `gdrt group`"
    try:
        info = json.loads((root / GROUPS_FILE).read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
        if "num_groups" in info:
            num_groups = info["num_groups"]
        elif isinstance(info["edges"], list):
            num_groups = len(info["edges"]) + 1  # G - 1 cut points
        else:
            raise TypeError(f"edges is {type(info['edges']).__name__}, not a list")
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise GdrtError(f"cannot be read as the groups' summary ({e})", path=str(root / GROUPS_FILE),
                        hint=f"it needs num_groups (or the edges); {remake}") from None
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or not 1 <= num_groups <= MAX_GROUPS:
        raise GdrtError(f"num_groups is {num_groups!r}, not a whole number from 1 to {MAX_GROUPS}",
                        path=str(root / GROUPS_FILE), hint=remake)
    info["num_groups"] = num_groups
    table = read_table(root / TOKEN_GROUPS_FILE, token_groups_columns())
    if table.num_rows:
        low, high = pc.min_max(table.column("group")).values()
        if low.as_py() < 0 or high.as_py() >= num_groups:
            raise GdrtError(f"group ids run from {low.as_py()} to {high.as_py()}, outside 0..{num_groups - 1} "
                            f"({num_groups} groups in {GROUPS_FILE})", path=str(root / TOKEN_GROUPS_FILE),
                            hint=remake)
    return info, table


def summary_line(config: GroupConfig, summary: dict) -> str:
    """The one line `gdrt group` prints."""
    sizes = ", ".join(f"{s}: {v}" for s, v in summary["sizes"].items())
    return (
        f"grouped {summary['tokens'].get('train', 0)} train target tokens into {config.num_groups} groups "
        f"-> {config.out} ({sizes})"
    )
