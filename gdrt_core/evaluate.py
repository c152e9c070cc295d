"""The evaluate stage: constrained beam search over the catalogue, ranking and fairness metrics.

`gdrt evaluate --dataset D --model M --out DIR [--split test] [--num-beams 10] [--limit N]` writes the
Eval artifact:

- predictions.parquet: example_id int64, rank int8 (0 = best), title string, score float32; one row
  per returned title, written row group by row group as batches finish (memory stays bounded);
- metrics.json: the keys of metrics.METRIC_KEYS (metrics.compute_metrics, the one place of the formulas);
  the manifest and MLflow also get the extended set (other K, popular share, per-group GP/GH);
- plots/ranking.png (HR@K and NDCG@K bars) and plots/exposure.png (share of each popularity group in the
  top-5 / top-10 vs in the evaluated histories).

The split is read in chunks; inside a chunk prompts are batched by similar length (less padding). Each
chunk's rankings stream into `metrics.MetricsAccumulator` and into predictions.parquet and are then dropped,
so memory is bounded by a chunk and the catalogue, whatever the split's size. With `--set workers=N` the
beam searches run in N processes, each with its own copy of the model and whole batches of a chunk to rank
(on CPUs the small matmuls of a 135M model scale better over processes than over threads). The workers are
started with multiprocessing's spawn method, so a script that calls `run` with workers > 1 needs Python's
`if __name__ == "__main__":` guard.

Popularity baselines instead of a model (`--model baseline:...`): every example gets the same ranking,
the titles counted most often (a title counts the sum of its ids), with the count as score. They load no
model and write the same artifact. They are the reference a recommender must beat to show that it uses
the history at all:

- `baseline:most-popular`: by training interactions (items.parquet `popularity`);
- `baseline:most-popular-valid`: by the targets of the valid split, the period just before test (refused
  on `--split valid`, where it would read its own answers).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gdrt_core.config import DTYPES, check_config, device_problem, field, to_dict
from gdrt_core.errors import GdrtError

PREDICTIONS_FILE = "predictions.parquet"
METRICS_FILE = "metrics.json"
PLOTS_DIR = "plots"
BASELINES = ("baseline:most-popular", "baseline:most-popular-valid")


@dataclass
class EvalConfig:
    dataset: str = field(path=True, help="Dataset artifact directory")
    model: str = field(path=True, help=f"model directory or hub id (a PEFT adapter directory works too), or one of {', '.join(BASELINES)}")
    out: str = field(path=True, help="output Eval directory")
    split: str = field("test", choices=("train", "valid", "test"), help="split to evaluate: train | valid | test")
    limit: int | None = field(None, ge=1, help="evaluate only the first N examples of the split (quick looks)")
    num_beams: int = field(10, ge=1, le=127, help="beams of the constrained beam search (= ranking length; ranks are int8)")
    num_return_sequences: int | None = field(None, ge=1, le=127, help="titles returned per example (default: num_beams)")
    length_penalty: float = field(0.0, help="0.0: rank by the sum of log-probs; 1.0: by the per-token mean")
    early_stopping: bool | str = field(False, choices=(True, False, "never"), help="transformers' beam-search stopping rule: false | true | never")
    renormalize: bool = field(False, help="re-normalise log-probs over the allowed tokens at each step")
    batch_size: int = field(16, ge=1, help="examples per beam-search batch (x num_beams rows per forward)")
    chunk_size: int = field(512, ge=1, help="examples read, length-sorted and written to disk together")
    dtype: str = field("auto", choices=DTYPES, help="auto (float32 on CPU, bfloat16 on a GPU) | float32 | bfloat16 | float16")
    matmul_dtype: str | None = field(None, choices=("float32", "bfloat16"), help="unset: the model's dtype | float32 | bfloat16: the beam search's linear layers in bfloat16 on a float32 model (faster on CPUs with avx512_bf16/AMX; rankings can differ: 10 of 64 top-10 lists on a fine-tuned SmolLM2, docs/benchmarks.md)")
    device: str = field("auto", check=device_problem, help="auto | cpu | cuda | cuda:N")
    threads: int | None = field(None, ge=1, help="torch CPU threads (per worker with workers > 1; None = torch's default, or the cores shared out among the workers)")
    workers: int = field(1, ge=1, le=64, help="processes that rank in parallel, each with its own copy of the model (CPU: 2 x 1 thread rank SmolLM2-135M faster than 1 x 2, docs/benchmarks.md)")
    plots: bool = field(True, help="draw plots/ranking.png and plots/exposure.png")
    progress: bool = field(True, help="show a progress bar with examples/s")

    def check(self, source: str) -> None:
        n_return = self.num_return_sequences or self.num_beams
        if n_return > self.num_beams:
            raise GdrtError(f"setting num_return_sequences={n_return} is invalid: must be <= num_beams "
                            f"({self.num_beams})", path=source)
        if self.model == "baseline:most-popular-valid" and self.split == "valid":
            raise GdrtError("baseline:most-popular-valid ranks by the valid split's targets; it cannot be "
                            "evaluated on valid", path=source, hint="use --split test, or baseline:most-popular")


def _split_batches(dataset, split: str, limit: int | None, chunk_size: int):
    """The split's rows as pyarrow record batches of at most `chunk_size`, stopping after `limit` rows."""
    import pyarrow.parquet as pq

    from gdrt_core.dataset import SPLITS

    if split not in SPLITS:
        raise GdrtError(f"unknown split {split!r}", hint=f"use one of {', '.join(SPLITS)}")
    parquet = pq.ParquetFile(dataset.root / f"{split}.parquet")
    remaining = parquet.metadata.num_rows if limit is None else min(limit, parquet.metadata.num_rows)
    total = remaining
    for batch in parquet.iter_batches(batch_size=chunk_size, columns=["example_id", "history", "target"]):
        if remaining <= 0:
            break
        if batch.num_rows > remaining:
            batch = batch.slice(0, remaining)
        remaining -= batch.num_rows
        yield total, batch


def most_popular_titles(titles: dict[int, str], counts: dict[int, int], n: int) -> list[tuple[str, int]]:
    """The n titles counted most often, as (title, count), most first. A title's count is the sum over its
    item ids (hits are title-level); ties go to the alphabetically first title, so the ranking is
    deterministic. Ids missing from `counts` count 0."""
    per_title: dict[str, int] = {}
    for item, title in titles.items():
        per_title[title] = per_title.get(title, 0) + int(counts.get(item, 0))
    return sorted(per_title.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def baseline_counts(dataset, name: str) -> dict[int, int]:
    """Item id -> count for the popularity baseline `name` (one of BASELINES)."""
    if name == "baseline:most-popular":
        items = dataset.items
        return dict(zip(items.column("item_id").to_pylist(), items.column("popularity").to_pylist(), strict=True))
    if name == "baseline:most-popular-valid":
        from collections import Counter

        return dict(Counter(dataset.split("valid").column("target").to_pylist()))
    raise GdrtError(f"unknown baseline {name!r}", hint=f"one of {', '.join(BASELINES)}")


class SampleNdcg:
    """NDCG@10 of a model on a fixed sample of a split, for model selection during training.

    The prompts, targets and trie are built once (the tokenizer does not change while training); each call
    ranks the sample with the evaluation's constrained beam search (`generation.rank_prompts`, default
    settings: 10 beams, sum of log-probs) and scores it with `metrics.target_rank` / `metrics.ndcg`, so the
    number equals `gdrt evaluate --split SPLIT --limit N`'s ndcg@10 for the same model. Errors propagate: a
    selection metric that cannot be computed must not pass for 0.0.
    """

    def __init__(self, dataset, tokenizer, *, split: str = "valid", limit: int, batch_size: int = 16):
        from gdrt_core.prompts import render
        from gdrt_core.tokenization import tokenize_prompt
        from gdrt_core.trie import build_trie

        titles = dataset.titles
        examples = list(dataset.examples(split, limit))
        if not examples:
            raise GdrtError(f"the {split} split has no examples for NDCG@10", path=str(dataset.root))
        self.prompts = [tokenize_prompt(tokenizer, render(dataset.domain, list(e.history_titles))).input_ids
                        for e in examples]  # [examples] token ids
        self.targets = [e.target_title for e in examples]
        self.trie = build_trie(tokenizer, titles)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.batch_size = batch_size
        self._device_trie = None

    def __len__(self) -> int:
        return len(self.prompts)

    def __call__(self, model) -> float:
        import torch

        from gdrt_core.generation import BeamSearchSettings, rank_prompts
        from gdrt_core.metrics import ndcg, target_rank

        device = next(model.parameters()).device
        if self._device_trie is None or self._device_trie.indptr.device != device:
            self._device_trie = self.trie.to_torch(device)
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                rankings = rank_prompts(model, self._device_trie, self.prompts, BeamSearchSettings(),
                                        batch_size=self.batch_size, pad_token_id=self.pad_token_id)
        finally:
            model.train(was_training)
        return ndcg([target_rank(r.titles, t) for r, t in zip(rankings, self.targets, strict=True)], 10)


def run(config: EvalConfig, *, model=None, tokenizer=None, context=None) -> dict:
    """Rank the split's examples, write the Eval artifact, log to MLflow; returns the metrics.

    `model` / `tokenizer` may be passed in (tests, notebooks); otherwise `config.model` is loaded.
    Steps: validate -> open the tracking run -> rank the split, streaming each chunk's rankings into the
    metric accumulator and predictions.parquet -> write metrics, plots and manifest -> log to the run.
    """
    from gdrt_core.artifacts import atomic_output_dir
    from gdrt_core.tracking import stage_run

    dataset, settings, guard = _validate(config)
    with stage_run("evaluate", to_dict(config), context) as tracker:
        with _ranker(config, dataset, settings, model, tokenizer) as rank_chunk, \
                atomic_output_dir(config.out, **guard) as tmp:
            accumulator, elapsed = _rank_split(config, dataset, rank_chunk, tmp / PREDICTIONS_FILE)
            metrics, extended = _write_results(tmp, config, accumulator, elapsed, dataset)
        _track(tracker, config, extended, accumulator.n_examples / elapsed)
    return metrics


def _validate(config: EvalConfig):
    """Checks before any work: the config, the output directory, the split. Returns (dataset, beam-search
    settings, the output guard)."""
    import torch

    from gdrt_core.artifacts import check_output
    from gdrt_core.dataset import Dataset
    from gdrt_core.generation import BeamSearchSettings

    check_config(config, "evaluate config")
    guard = {"kind": "eval", "inputs": {"dataset": config.dataset, "model": config.model}}
    check_output(config.out, **guard)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dataset = Dataset(config.dataset)
    dataset.require_examples(config.split, "to evaluate")
    settings = BeamSearchSettings(
        num_beams=config.num_beams, num_return_sequences=config.num_return_sequences or config.num_beams,
        length_penalty=config.length_penalty, early_stopping=config.early_stopping, renormalize=config.renormalize,
        matmul_dtype=config.matmul_dtype,
    )
    return dataset, settings, guard


@contextmanager
def _ranker(config: EvalConfig, dataset, settings, model, tokenizer):
    """A context giving rank_chunk(histories, example_ids, on_batch) -> one Ranking per example: the popularity
    baseline's fixed ranking, the model's constrained beam search in this process (the model is loaded here
    unless passed in), or, with `workers` > 1 and no model passed in, the same search in a pool of worker
    processes (`_pooled_ranker`), shut down when the context ends."""
    if config.model.startswith("baseline:"):
        from gdrt_core.generation import Ranking

        top = most_popular_titles(dataset.titles, baseline_counts(dataset, config.model), settings.num_return_sequences)
        fixed = Ranking([t for t, _ in top], [float(c) for _, c in top], [])

        def rank_baseline(hist_lists, ids, on_batch):
            on_batch(len(hist_lists))
            return [fixed] * len(hist_lists)

        yield rank_baseline
    elif config.workers > 1 and model is None:
        with _pooled_ranker(config, dataset, settings) as rank_pooled:
            yield rank_pooled
    else:
        yield _model_ranker(config, dataset, settings, model, tokenizer)


def _model_ranker(config: EvalConfig, dataset, settings, model=None, tokenizer=None):
    """rank_chunk(histories, example_ids, on_batch) with the model's constrained beam search
    (`generation.rank_prompts`: batches of similar prompt length) in this process."""
    import torch

    from gdrt_core.generation import rank_prompts
    from gdrt_core.prompts import render
    from gdrt_core.tokenization import context_limit, tokenize_prompt
    from gdrt_core.trie import build_trie

    titles = dataset.titles
    if model is None or tokenizer is None:
        from gdrt_core.models import ModelConfig, load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            config.model, ModelConfig(dtype=config.dtype, device=config.device, padding_side="left"),
            merge_adapter=True,  # a LoRA adapter folded into the weights: plain, faster forward passes
        )
    model.eval()
    trie = build_trie(tokenizer, titles).to_torch(next(model.parameters()).device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    max_length = context_limit(model, tokenizer)

    def rank_model(hist_lists, ids, on_batch):
        prompts = [
            tokenize_prompt(
                tokenizer, render(dataset.domain, [titles[h] for h in hist]), max_length=max_length,
                reserve=trie.trie.max_depth, name=f"{config.dataset}: example {eid} of the {config.split} split",
            ).input_ids
            for hist, eid in zip(hist_lists, ids, strict=True)
        ]
        with torch.inference_mode():
            return rank_prompts(model, trie, prompts, settings, batch_size=config.batch_size,
                                pad_token_id=pad_id, on_batch=on_batch)

    return rank_model


# the model ranker of a worker process of `_pooled_ranker` (set by `_start_worker`), or the error that
# prevented it, raised again by each task so that it reaches the parent as the cause
_WORKER: dict = {}


def _start_worker(config: EvalConfig, settings, threads: int) -> None:
    import signal

    import torch

    from gdrt_core.dataset import Dataset

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent stops us
    torch.set_num_threads(threads)
    # No progress bars here: one per worker would cut through the parent's, and tqdm's multiprocessing lock,
    # left registered by a worker the parent terminates, makes the resource tracker print two warning lines
    # after the stage's error (the line a sweep reports as the cause).
    import threading

    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    tqdm.set_lock(threading.RLock())
    try:
        _WORKER["rank"] = _model_ranker(config, Dataset(config.dataset), settings)
    except Exception as e:  # noqa: BLE001 - re-raised by every task (`_rank_in_worker`)
        _WORKER["error"] = e


def _rank_in_worker(hist_lists, ids):
    if "error" in _WORKER:
        raise _WORKER["error"]
    return _WORKER["rank"](hist_lists, ids, None)


@contextmanager
def _pooled_ranker(config: EvalConfig, dataset, settings):
    """rank_chunk over `config.workers` processes (multiprocessing's spawn start method, safe with torch and
    CUDA), each loading the model once (its directory is checked here first) and ranking whole beam-search
    batches: a chunk's examples, longest history first (by characters), cut into batches of `batch_size`, one
    task each. Results come back in the chunk's order and equal one process's rankings up to float32 rounding
    (another batch composition). On CPUs the small matmuls of a 135M model scale better over processes than
    over threads. An error in a worker (the model cannot be loaded, a prompt too long) is raised here; leaving
    the context early (an error, Ctrl-C, SIGTERM) cancels the waiting batches and stops the workers."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    from gdrt_core.models import available_cores, check_model_source

    check_model_source(config.model)  # a bad --model is reported before any worker starts
    threads = config.threads or max(1, available_cores() // config.workers)
    titles = dataset.titles
    pool = ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker, initargs=(config, settings, threads))

    def rank_pooled(hist_lists, ids, on_batch):
        order = sorted(range(len(ids)), key=lambda i: -sum(len(titles[h]) for h in hist_lists[i]))
        batches = [order[s:s + config.batch_size] for s in range(0, len(order), config.batch_size)]
        tasks = {pool.submit(_rank_in_worker, [hist_lists[i] for i in b], [ids[i] for i in b]): b for b in batches}
        results: list = [None] * len(ids)
        for task in as_completed(tasks):
            batch = tasks[task]
            try:
                rankings = task.result()
            except BrokenProcessPool as e:
                raise GdrtError(
                    f"a worker process of the evaluation ended without reporting an error: it was killed, or it could "
                    f"not start ({e})", path=config.out,
                    hint="out of memory? use fewer workers (--set workers=N); a script that calls evaluate needs "
                         "`if __name__ == \"__main__\":` (the workers import it; its message is above)",
                ) from e
            for i, ranking in zip(batch, rankings, strict=True):
                results[i] = ranking
            on_batch(len(batch))
        return results

    try:
        yield rank_pooled
    except BaseException:
        running = list((getattr(pool, "_processes", None) or {}).values())  # (shutdown forgets them)
        pool.shutdown(wait=False, cancel_futures=True)
        for process in running:  # stop the batches they are ranking
            process.terminate()
        raise
    pool.shutdown(wait=True)


def _rank_split(config: EvalConfig, dataset, rank_chunk, predictions_path: Path):
    """Rank the split chunk by chunk. Each chunk's rankings go into the metric accumulator and into one row
    group of predictions.parquet, then are dropped: memory is bounded by a chunk and the catalogue, not by
    the split. Returns (the accumulator, seconds)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from gdrt_core.metrics import MetricsAccumulator, TitleCatalogue

    titles = dataset.titles
    accumulator = MetricsAccumulator(TitleCatalogue.from_dataset(dataset), extended=True)
    schema = pa.schema([
        ("example_id", pa.int64()), ("rank", pa.int8()), ("title", pa.string()), ("score", pa.float32()),
    ])
    started = time.perf_counter()
    writer = pq.ParquetWriter(predictions_path, schema)
    bar = None
    try:
        for total, batch in _split_batches(dataset, config.split, config.limit, config.chunk_size):
            if bar is None:
                bar = tqdm(total=total, desc=f"evaluate {config.split}", unit="ex", disable=not config.progress)
            ids = batch.column("example_id").to_pylist()
            histories = batch.column("history").to_pylist()
            targets = batch.column("target").to_pylist()
            rows = {"example_id": [], "rank": [], "title": [], "score": []}
            for eid, ranking, target, history in zip(
                ids, rank_chunk(histories, ids, bar.update), targets, histories, strict=True
            ):
                accumulator.add(ranking.titles, titles[target], history)
                rows["example_id"].extend([eid] * len(ranking.titles))
                rows["rank"].extend(range(len(ranking.titles)))
                rows["title"].extend(ranking.titles)
                rows["score"].extend(ranking.scores)
            writer.write_table(pa.table(rows, schema=schema))
    finally:
        writer.close()
        if bar is not None:
            bar.close()
    return accumulator, time.perf_counter() - started


def _write_results(tmp: Path, config: EvalConfig, accumulator, elapsed: float, dataset) -> tuple[dict, dict]:
    """metrics.json (the contract's keys), the plots and the manifest (the extended set). Returns (metrics,
    extended metrics)."""
    from gdrt_core.artifacts import MANIFEST, write_json_atomic, write_manifest
    from gdrt_core.metrics import METRIC_KEYS

    extended = accumulator.result()
    metrics = {k: extended[k] for k in METRIC_KEYS}  # metrics.json: the contract's keys only
    write_json_atomic(tmp / METRICS_FILE, metrics)
    if config.plots:
        _plot(tmp / PLOTS_DIR, metrics, {k: accumulator.fairness(k) for k in (5, 10)})
    inputs = {"dataset": config.dataset}
    if (Path(config.model) / MANIFEST).is_file():
        inputs["model"] = config.model
    write_manifest(
        tmp, "eval", config=to_dict(config), inputs=inputs, metrics=extended,
        timing={"seconds": round(elapsed, 3), "examples_per_second": round(accumulator.n_examples / elapsed, 3)},
        ranked={"split": config.split, "split_sha256": split_sha256(dataset, config.split)},
    )
    return metrics, extended


def _track(tracker, config: EvalConfig, extended: dict, examples_per_second: float) -> None:
    """The run's metrics (the extended set: other K, per-group shares), its speed and the artifact."""
    tracker.log_metrics({k: float(v) for k, v in extended.items()})
    tracker.log_metrics({"examples_per_second": examples_per_second})
    tracker.log_artifacts(config.out)


def _plot(plots_dir: Path, metrics: dict, exposure: dict) -> None:
    """plots/ranking.png: HR/NDCG bars; plots/exposure.png: popularity-group shares vs histories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    ks = (1, 5, 10)
    x = np.arange(len(ks))
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(x - 0.2, [metrics[f"hr@{k}"] for k in ks], 0.4, label="HR@K")
    ax.bar(x + 0.2, [metrics[f"ndcg@{k}"] for k in ks], 0.4, label="NDCG@K")
    ax.set_xticks(x, [f"K={k}" for k in ks])
    ax.set_title(f"Ranking ({metrics['n_examples']} examples)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(plots_dir / "ranking.png", dpi=100)
    plt.close(fig)

    groups = np.arange(len(exposure[5].gh))
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(groups - 0.27, exposure[5].gp, 0.27, label="top-5 share (GP@5)")
    ax.bar(groups, exposure[10].gp, 0.27, label="top-10 share (GP@10)")
    ax.bar(groups + 0.27, exposure[10].gh, 0.27, label="history share (GH)")
    ax.set_xticks(groups, [f"group {g}" for g in groups])
    ax.set_xlabel("popularity group (0 = least popular)")
    ax.set_title(f"Exposure: MGU@5 {metrics['mgu@5']:.3f}, MGU@10 {metrics['mgu@10']:.3f}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots_dir / "exposure.png", dpi=100)
    plt.close(fig)


def summary_line(config: EvalConfig, metrics: dict) -> str:
    """The one line `gdrt evaluate` prints."""
    return (
        f"evaluate {config.split}: {metrics['n_examples']} examples, HR@10 {metrics['hr@10']:.4f}, "
        f"NDCG@10 {metrics['ndcg@10']:.4f}, MGU@10 {metrics['mgu@10']:.4f} -> {config.out}"
    )


def split_sha256(dataset, split: str) -> str | None:
    """The sha256 of the Dataset's `split`.parquet as its manifest records it (None when it does not)."""
    return (dataset.manifest.get("files", {}).get(f"{split}.parquet") or {}).get("sha256")


@dataclass(frozen=True)
class Rankings:
    """Stored rankings (`read_rankings`): example id -> returned titles in rank order, and what the Eval manifest
    next to them says was ranked (None for a bare predictions file, or an Eval artifact from before it said)."""

    path: Path
    titles: dict[int, list[str]]
    split: str | None = None
    split_sha256: str | None = None


def score_predictions(dataset, predictions, split: str | None = None) -> dict[str, float | int]:
    """The metrics of stored rankings against a Dataset: the extended set of the Eval manifest.

    dataset: a Dataset artifact directory (or `gdrt_core.dataset.Dataset`); predictions: an Eval directory of
    `gdrt evaluate` or its predictions.parquet (columns example_id, rank, title; one row per returned title,
    ranks 0..n-1 per example); split: the split they rank (default: the Eval manifest's, else test). The
    examples scored are those the file holds (the first N with `--limit`), each with its titles in rank order;
    targets, histories, titles and popularity groups come from `dataset`. The same accumulator as the stage
    (`metrics.MetricsAccumulator`), so on the dataset it was ranked on the result equals the manifest's metrics.
    What it is for: the fairness metrics again after the dataset's popularity groups change (curate's
    `popularity_from`), without ranking again. Returns the metrics plus "scored": dataset, predictions, split.

    Errors (GdrtError, naming the file): see `read_rankings`; an example id that is not in the split; an Eval
    artifact whose manifest records another split file than the dataset's (another curation, or split).
    """
    from gdrt_core.metrics import MetricsAccumulator, TitleCatalogue

    rankings = read_rankings(predictions)
    split = split or rankings.split or "test"
    ds = _dataset(dataset, split, rankings)
    accumulator = MetricsAccumulator(TitleCatalogue.from_dataset(ds), extended=True)
    for eid, target, history in _ranked_rows(ds, split, rankings):
        accumulator.add(rankings.titles[eid], ds.titles[target], history)
    return {**accumulator.result(), "scored": {"dataset": str(ds.root), "predictions": str(rankings.path),
                                               "split": split}}


COMPARED_METRICS = ("hr@5", "hr@10", "ndcg@5", "ndcg@10", "mgu@5", "dgu@5", "mgu@10", "dgu@10")


def compare_predictions(dataset, a, b, split: str | None = None, *, resamples: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of two models' rankings of the same examples (two Eval artifacts, or their
    predictions.parquet files): each model's HR@5/10, NDCG@5/10, MGU@5/10, DGU@5/10 and the difference A - B
    with a paired percentile bootstrap interval over examples (the same resampled examples for both and for
    every metric; `metrics.bootstrap_intervals`), its size relative to B, and how many examples each hits in
    the top 10. split: default the Eval manifests', else test.

    MGU and DGU are ratios of sums over the examples, so each resample recomputes the pooled group shares
    (`metrics.ExampleTerms`). The interval holds the two models fixed: the spread between training seeds is
    not in it. GdrtError: see `score_predictions`, and when the two rank different examples or return
    rankings of different lengths (a top 5 and a top 10 would compare HR@10 with HR@5).
    Returns {"examples", "split", "dataset", "resamples", "seed", "a": {"predictions", metrics...}, "b": {...},
    "difference": {metric: {"value", "relative", "ci95"}}, "hits@10": {"both", "only_a", "only_b"}}.
    """
    from gdrt_core.metrics import TitleCatalogue, bootstrap_intervals, example_terms, resample_weights

    ra, rb = read_rankings(a), read_rankings(b)
    if ra.split and rb.split and ra.split != rb.split:
        raise GdrtError(f"A ranked the {ra.split} split ({ra.path}) and B the {rb.split} split ({rb.path})",
                        hint="compare two evaluations of the same split")
    split = split or ra.split or rb.split or "test"
    ds = _dataset(dataset, split, ra, rb)
    rows = _ranked_rows(ds, split, ra, rb)  # the split read once for both
    if ra.titles.keys() != rb.titles.keys():
        both = len(ra.titles.keys() & rb.titles.keys())
        raise GdrtError(f"{ra.path} and {rb.path} rank different examples ({len(ra.titles)} and {len(rb.titles)}, "
                        f"{both} in both)", hint="evaluate both models with the same --dataset, --split and --limit")
    longest_a, longest_b = (max(map(len, r.titles.values())) for r in (ra, rb))
    if longest_a != longest_b:
        raise GdrtError(f"{ra.path} returns up to {longest_a} titles per example and {rb.path} up to "
                        f"{longest_b}: their HR@10 and NDCG@10 would not measure the same list",
                        hint="evaluate both models with the same --num-beams")
    catalogue = TitleCatalogue.from_dataset(ds)
    targets, histories = [ds.titles[t] for _, t, _ in rows], [h for _, _, h in rows]
    ta, tb = (example_terms([r.titles[eid] for eid, _, _ in rows], targets, histories, catalogue) for r in (ra, rb))
    n = len(rows)
    result: dict = {"examples": n, "split": split, "dataset": str(ds.root), "resamples": resamples, "seed": seed,
                    "a": {"predictions": str(ra.path)}, "b": {"predictions": str(rb.path)}, "difference": {}}

    def differences(idx: np.ndarray) -> np.ndarray:  # [r, metrics] A - B on each resample idx [r, n]
        weights = resample_weights(idx, n)
        return np.stack([ta.metric(m, weights) - tb.metric(m, weights) for m in COMPARED_METRICS], axis=1)

    intervals = bootstrap_intervals(differences, n, resamples=resamples, seed=seed)
    for m, ci in zip(COMPARED_METRICS, intervals, strict=True):
        va, vb = float(ta.metric(m)[0]), float(tb.metric(m)[0])
        result["a"][m], result["b"][m] = va, vb
        result["difference"][m] = {"value": va - vb, "relative": (va - vb) / vb if vb else None, "ci95": ci}
    hit_a, hit_b = (ta.rank >= 0) & (ta.rank < 10), (tb.rank >= 0) & (tb.rank < 10)
    result["hits@10"] = {"both": int(np.sum(hit_a & hit_b)), "only_a": int(np.sum(hit_a & ~hit_b)),
                         "only_b": int(np.sum(~hit_a & hit_b))}
    return result


def format_predictions_comparison(result: dict) -> str:
    """`compare_predictions`'s result as the lines `gdrt compare-predictions` prints."""
    n, a, b = result["examples"], result["a"], result["b"]
    lines = [f"{label} {side['predictions']}: " + ", ".join(f"{m.upper()} {side[m]:.4f}" for m in COMPARED_METRICS)
             for label, side in (("A", a), ("B", b))]
    examples = "example" if n == 1 else "examples"
    lines.append(f"A - B on the same {n} {result['split']} {examples} (95% paired bootstrap interval, relative to B):")
    for m, d in result["difference"].items():
        ci = "(no interval)" if d["ci95"] is None else f"({d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f})"
        rel = "" if d["relative"] is None else f" {100 * d['relative']:+.1f}%"
        lines.append(f"  {m:<8} {d['value']:+.4f} {ci}{rel}")
    h = result["hits@10"]
    lines.append(f"hits in the top 10: both {h['both']}, only A {h['only_a']}, only B {h['only_b']}")
    return "\n".join(lines)


def _dataset(dataset, split: str, *rankings: Rankings):
    """The Dataset (checked to hold examples in `split`); a GdrtError when an Eval manifest of `rankings` records
    a ranked split file other than this dataset's (the ids would name other windows)."""
    from gdrt_core.dataset import Dataset

    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    ds.require_examples(split, "to score predictions against")
    ours = split_sha256(ds, split)
    for r in rankings:
        if r.split_sha256 is not None and r.split == split and ours is not None and r.split_sha256 != ours:
            raise GdrtError(f"the predictions rank another {split} split than {ds.root}'s (its {split}.parquet has "
                            f"sha256 {ours[:12]}..., the Eval manifest records {r.split_sha256[:12]}...)",
                            path=str(r.path), hint="score predictions against the dataset they were ranked on; "
                            "a recuration that keeps the windows (e.g. another popularity_from) keeps the split file")
    return ds


def read_rankings(predictions) -> Rankings:
    """The stored rankings of a predictions.parquet or its Eval directory (whose manifest, when it records them,
    gives the ranked split and its sha256).

    GdrtError naming the file: missing, not readable as parquet, no rows, a column of example_id (integer) /
    rank (integer) / title (string) missing, of another type or with nulls, or an example whose ranks are not
    0..n-1 (what the evaluate stage writes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gdrt_core.artifacts import MANIFEST, read_manifest

    path = Path(predictions)
    ranked: dict = {}
    if path.is_dir():
        if (path / MANIFEST).is_file():
            ranked = read_manifest(path, "eval", verify=False).get("ranked") or {}
        path = path / PREDICTIONS_FILE
    hint = f"give an Eval artifact directory or its {PREDICTIONS_FILE}"
    if not path.is_file():
        raise GdrtError("no such predictions file", path=str(path), hint=hint)
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow's ArrowInvalid, OSError of a corrupt page, ...: not a readable parquet file
        raise GdrtError(f"not a readable parquet file ({e})", path=str(path), hint=hint) from e
    kinds = {"example_id": pa.types.is_integer, "rank": pa.types.is_integer,
             "title": lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)}
    missing = [c for c in kinds if c not in table.column_names]
    if missing:
        raise GdrtError(f"predictions lack the column(s) {', '.join(missing)}", path=str(path), hint=hint)
    for name, is_kind in kinds.items():
        column = table.column(name)
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
            table = table.set_column(table.column_names.index(name), name, column)
        if not is_kind(column.type):
            want = "strings" if name == "title" else "integers"
            raise GdrtError(f"column {name} holds {column.type}, expected {want}", path=str(path), hint=hint)
        if column.null_count:
            raise GdrtError(f"column {name} has {column.null_count} null value(s)", path=str(path), hint=hint)
    if table.num_rows == 0:
        raise GdrtError("the predictions file has no rows", path=str(path), hint=hint)
    ranks_of: dict[int, dict[int, str]] = {}
    for eid, rank, title in zip(*(table.column(c).to_pylist() for c in kinds), strict=True):
        ranks = ranks_of.setdefault(eid, {})
        if rank in ranks:
            raise GdrtError(f"example {eid} has rank {rank} twice", path=str(path))
        ranks[rank] = title
    for eid, ranks in ranks_of.items():
        if sorted(ranks) != list(range(len(ranks))):
            shown = sorted(ranks)[:12]
            raise GdrtError(f"example {eid} has the ranks {shown}{' ...' if len(ranks) > 12 else ''}, expected "
                            f"0..{len(ranks) - 1}", path=str(path), hint="rank 0 is the best title of an example")
    return Rankings(path, {eid: [ranks[r] for r in range(len(ranks))] for eid, ranks in ranks_of.items()},
                    ranked.get("split"), ranked.get("split_sha256"))


def _ranked_rows(ds, split: str, *rankings: Rankings) -> list[tuple[int, int, list[int]]]:
    """(example id, target, history) of the split's examples that the rankings hold, in split order, read in one
    pass; a GdrtError when a ranking holds an example that is not in the split."""
    import pyarrow.parquet as pq

    wanted = set().union(*(r.titles.keys() for r in rankings))
    rows = []
    for batch in pq.ParquetFile(ds.root / f"{split}.parquet").iter_batches(columns=["example_id", "target", "history"]):
        rows += [row for row in zip(*(batch.column(c).to_pylist() for c in ("example_id", "target", "history")),
                                    strict=True) if row[0] in wanted]
    found = {eid for eid, _, _ in rows}
    for r in rankings:
        if unknown := sorted(r.titles.keys() - found):
            raise GdrtError(f"{len(unknown)} example id(s) of the predictions are not in the {split} split of "
                            f"{ds.root}, e.g. {unknown[0]}", path=str(r.path),
                            hint="score predictions against the dataset and split they were ranked on (--split)")
    return rows
