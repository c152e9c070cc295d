"""`gdrt recommend`: top-K catalogue titles for a history, from a model dir or an MLflow models:/ URI.

    gdrt recommend --model models:/gdrt-office@champion --history "title a" "title b" --k 10 [--out recs.parquet]
    gdrt recommend --model runs/x/model --input histories.parquet --out recs.parquet   # or recs.csv
    gdrt recommend --model baseline:most-popular --dataset runs/x/stages/curate --history "title a"

The same prompt, tokenisation, trie and constrained beam search as the evaluate stage; a popularity baseline
(`baseline:most-popular`, `baseline:most-popular-valid`) gives every history the ranking the evaluate stage
gives it, from the --dataset's counts, with no model loaded. --out writes parquet, or CSV for a .csv name (list
columns as JSON text); another suffix is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gdrt_core.errors import GdrtError


@dataclass
class Recommendation:
    titles: list[str]
    scores: list[float]


class Recommender:
    """A model + tokenizer + catalogue trie, ready to rank histories (given as titles, oldest first)."""

    def __init__(self, model, tokenizer, titles: dict[int, str], domain: str, *, batch_size: int = 8):
        from gdrt_core.trie import build_trie

        self.model, self.tokenizer, self.domain, self.batch_size = model, tokenizer, domain, batch_size
        self.model.eval()
        device = next(model.parameters()).device
        self.trie = build_trie(tokenizer, titles).to_torch(device)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def catalogue(self) -> set[str]:
        """The distinct titles it can recommend."""
        return set(self.trie.trie.titles)

    @classmethod
    def load(cls, model_dir: str | os.PathLike, *, items: str | os.PathLike | None = None,
             domain: str | None = None, device: str = "auto") -> Recommender:
        """Load a model directory; the catalogue and domain default to the dataset it was trained on (its
        files checked against their sha256, as every stage checks its inputs)."""
        import pyarrow.parquet as pq

        from gdrt_core.dataset import Dataset
        from gdrt_core.models import ModelConfig, load_model_and_tokenizer

        if items is None:
            dataset = Dataset(trained_dataset(model_dir))
            titles, domain = dataset.titles, domain or dataset.domain
        else:
            if domain is None:
                domain = Dataset(trained_dataset(model_dir)).domain
            table = pq.read_table(items, columns=["item_id", "title"])
            titles = dict(zip(table.column("item_id").to_pylist(), table.column("title").to_pylist(), strict=True))
        model, tokenizer = load_model_and_tokenizer(
            model_dir, ModelConfig(device=device, padding_side="left"), merge_adapter=True
        )
        return cls(model, tokenizer, titles, domain)

    def recommend(self, histories: list[list[str]], k: int = 10) -> list[Recommendation]:
        import torch

        from gdrt_core.generation import BeamSearchSettings, rank_prompts
        from gdrt_core.prompts import render
        from gdrt_core.tokenization import context_limit, tokenize_prompt

        if k < 1:
            raise GdrtError(f"k must be positive, got {k}")
        distinct = len(self.trie.trie.titles)  # one per distinct title (duplicates share a path)
        check_k(k, distinct)  # the beam search keeps k beams: more titles than exist would only cost memory
        check_histories(histories)
        max_length = context_limit(self.model, self.tokenizer)
        prompts = [
            tokenize_prompt(self.tokenizer, render(self.domain, list(h)), max_length=max_length,
                            reserve=self.trie.trie.max_depth, name=f"history {row}").input_ids
            for row, h in enumerate(histories)
        ]
        settings = BeamSearchSettings(num_beams=k, num_return_sequences=k)
        with torch.inference_mode():
            rankings = rank_prompts(self.model, self.trie, prompts, settings, batch_size=self.batch_size,
                                    pad_token_id=self.pad_id)
        return [Recommendation(list(r.titles), [float(s) for s in r.scores]) for r in rankings]


class PopularityRecommender:
    """A popularity baseline as a recommender: every history gets the same titles, the ones counted most
    often (`evaluate.most_popular_titles`), with the count as score."""

    def __init__(self, titles: dict[int, str], counts: dict[int, int]):
        self.titles, self.counts = titles, counts

    def catalogue(self) -> set[str]:
        """The distinct titles it can recommend."""
        return set(self.titles.values())

    def recommend(self, histories: list[list[str]], k: int = 10) -> list[Recommendation]:
        from gdrt_core.evaluate import most_popular_titles

        if k < 1:
            raise GdrtError(f"k must be positive, got {k}")
        check_k(k, len(self.catalogue()))
        check_histories(histories)
        top = most_popular_titles(self.titles, self.counts, k)
        return [Recommendation([t for t, _ in top], [float(c) for _, c in top]) for _ in histories]


# what --model accepts, for the errors of a value that is none of them
MODEL_FORMS = ("a model directory, an MLflow URI (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH), "
               "a hub id with --dataset, or a popularity baseline (baseline:most-popular, "
               "baseline:most-popular-valid) with --dataset")


def check_k(k: int, distinct: int) -> None:
    """k (the number of titles asked for) is at most the catalogue's number of distinct titles."""
    if k > distinct:
        raise GdrtError(f"k={k} is more than the {distinct:,} distinct titles of the catalogue",
                        hint=f"ask for at most {distinct} (k={distinct} ranks the whole catalogue)")


def history_warnings(histories: list[list[str]], catalogue: set[str], limit: int = 3) -> list[str]:
    """What a person should know about histories the recommender can still rank: empty ones (the ranking then
    ignores the user) and titles that are not in the catalogue (read as text, but no item the model was trained
    on: a typo, or another catalogue). One line each, at most `limit` examples."""
    lines = []
    empty = [row for row, h in enumerate(histories) if not h]
    if empty:
        lines.append(f"{len(empty)} of {len(histories)} histories are empty (rows {', '.join(map(str, empty[:limit]))}"
                     f"{', ...' if len(empty) > limit else ''}): their ranking does not depend on the user")
    titles = [t for h in histories for t in h]
    unknown = [t for t in dict.fromkeys(titles) if t not in catalogue]
    if unknown:
        shown = ", ".join(repr(t[:60]) for t in unknown[:limit]) + (", ..." if len(unknown) > limit else "")
        lines.append(f"{sum(t not in catalogue for t in titles)} of {len(titles)} history titles are not in the "
                     f"catalogue ({shown}): the model reads them as text, not as items it was trained on")
    return lines


def check_histories(histories, where: str | None = None) -> None:
    """Every history is a list of non-empty title strings (curate refuses empty titles: none can match)."""
    for row, history in enumerate(histories):
        if isinstance(history, str) or not isinstance(history, (list, tuple)):
            raise GdrtError(f"history {row} is {type(history).__name__} {history!r}, not a list of titles",
                            path=where, hint="each history is a list of item titles, oldest first")
        for position, title in enumerate(history):
            if not isinstance(title, str):
                raise GdrtError(f"history {row}, title {position} is {type(title).__name__} {title!r}, not a string",
                                path=where, hint="each history is a list of item titles, oldest first")
            if not title.strip():
                raise GdrtError(f"history {row}, title {position} is empty", path=where,
                                hint="give each item's title text")
    check_history_text(histories, where)


def read_histories(path: str) -> list:
    """The `history` column of a parquet file: a list of title strings per row (checked, before any model
    is loaded)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise GdrtError("the --input file does not exist" if not Path(path).exists() else "the --input is not a file",
                        path=path)
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise GdrtError(f"cannot read the --input as parquet ({e})", path=path) from None
    if "history" not in table.column_names:
        raise GdrtError("the input has no `history` column (a list of titles per row)", path=path)
    kind = table.schema.field("history").type
    if not ((pa.types.is_list(kind) or pa.types.is_large_list(kind))
            and (pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type))):
        raise GdrtError(f"the `history` column holds {kind}, not a list of title strings", path=path,
                        hint="write each history as a list of item titles, oldest first")
    histories = table.column("history").to_pylist()
    check_histories(histories, where=path)
    return histories


def check_history_text(histories: list[list[str]], where: str | None = None) -> None:
    """History titles are held to the same text rules as curated titles (`text.text_problem`)."""
    from gdrt_core.text import printable, text_problem

    for row, history in enumerate(histories):
        for position, title in enumerate(history):
            problem = text_problem(title) if isinstance(title, str) else None
            if problem is not None:
                raise GdrtError(
                    f"history {row}, title {position} ({printable(title)!r}): {problem[0]}: it {problem[1]}",
                    path=where, hint="pass titles as they appear in the catalogue",
                )


def trained_dataset(model_dir: str | os.PathLike) -> str:
    """The Dataset artifact a model was trained on (from its manifest's inputs)."""
    manifest = Path(model_dir) / "manifest.json"
    try:
        inputs = json.loads(manifest.read_text(encoding="utf-8")).get("inputs", {})
        return inputs["dataset"]["path"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        raise GdrtError(
            "cannot tell which catalogue this model recommends from (no dataset in its manifest)",
            path=str(model_dir), hint="pass --dataset DIR",
        ) from None


def load_recommender(model: str, *, dataset: str | None = None, domain: str | None = None):
    """A Recommender from a model dir, or the python model inside an MLflow `models:/...` URI; a
    PopularityRecommender for a `baseline:...` with a `dataset`. A path that does not exist, or an unknown
    baseline, is an error listing what `model` may be (before anything is loaded)."""
    if model.startswith("baseline:"):
        from gdrt_core.dataset import Dataset
        from gdrt_core.evaluate import BASELINES, baseline_counts

        if model not in BASELINES:
            raise GdrtError(f"unknown popularity baseline {model!r}", path="--model",
                            hint=f"--model takes {MODEL_FORMS}")
        if not dataset:
            raise GdrtError(f"{model} ranks the titles of a Dataset artifact: give it with --dataset DIR",
                            path="--model")
        checked = Dataset(dataset)
        return PopularityRecommender(checked.titles, baseline_counts(checked, model))
    if model.startswith(("models:/", "runs:/")):
        import shutil

        from gdrt_core.registry import load_verified_model
        from gdrt_core.tracking import tracking_uri

        try:  # a dead server or a missing store: an error naming it in seconds (tracking.model_store_uri)
            loaded, local = load_verified_model(model)
        except GdrtError:
            raise
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds; the user needs the URI and cause
            raise GdrtError(f"cannot load {model} from MLflow at {tracking_uri()}: {e}") from None
        shutil.rmtree(local, ignore_errors=True)  # loaded into memory; nothing reads the files again
        return loaded.unwrap_python_model().recommender
    from gdrt_core.models import _looks_local

    if _looks_local(model):
        if not Path(model).expanduser().exists():
            raise GdrtError(f"no model directory at {model}", path="--model", hint=f"--model takes {MODEL_FORMS}")
        model = str(Path(model).expanduser())  # `~/models/x` as typed in a config or quoted on a command line
    items = None
    if dataset:
        from gdrt_core.dataset import Dataset

        checked = Dataset(dataset)  # its files against their sha256: a modified catalogue is refused
        items, domain = str(checked.root / "items.parquet"), domain or checked.domain
    return Recommender.load(model, items=items, domain=domain)


# what --out may end in: the file format of the rankings
OUT_SUFFIXES = (".parquet", ".csv")


def check_out_suffix(out: str) -> None:
    """--out ends in .parquet or .csv (any case): the format the rankings are written in. Another suffix (a
    .json, a name without one) is refused before any model is loaded, not written as parquet bytes."""
    suffix = Path(out).suffix
    if suffix.lower() not in OUT_SUFFIXES:
        found = f"ends in {suffix!r}" if suffix else "has no suffix"
        raise GdrtError(f"the --out file {found}: rankings are written as .parquet or .csv", path=out,
                        hint="name the file recs.parquet (list columns) or recs.csv (lists as JSON text)")


def csv_table(table):
    """`table` as a CSV can hold it: each list column (history, recommendations, scores, and any nested column
    of the --input) as JSON text, float32 scores written as float32 prints them; scalar columns unchanged."""
    import numpy as np
    import pyarrow as pa

    columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_nested(column.type):
            values = column.to_pylist()
            if pa.types.is_list(column.type) and pa.types.is_float32(column.type.value_type):
                values = [v if v is None else [x if x is None else float(str(np.float32(x))) for x in v]
                          for v in values]
            column = pa.array([v if v is None else json.dumps(v, ensure_ascii=False) for v in values], pa.string())
        columns[name] = column
    return pa.table(columns)


def write_rankings(table, out: str) -> None:
    """Write the rankings table to `out`, atomically: CSV for a .csv suffix (`csv_table`), else parquet."""
    from gdrt_core.artifacts import atomic_file

    with atomic_file(out) as tmp:
        if Path(out).suffix.lower() == ".csv":
            import pyarrow.csv as pa_csv

            pa_csv.write_csv(csv_table(table), tmp)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)


def cli(args: argparse.Namespace) -> None:
    """Rank --history (printed) or the histories of --input; --out writes them as parquet, or CSV for a .csv
    (required with --input): the input's columns, or a `history` column for --history, plus `recommendations`
    and `scores`."""
    if bool(args.history) == bool(args.input):
        raise GdrtError("give either --history TITLE ... or --input histories.parquet")
    if args.k < 1:
        raise GdrtError(f"--k must be positive, got {args.k}")
    if args.domain is not None:
        from gdrt_core.prompts import get_domain

        get_domain(args.domain)
    if args.input and not args.out:
        raise GdrtError("--input needs --out (the .parquet or .csv file to write the recommendations to)")
    if args.out is not None:
        from gdrt_core.artifacts import check_output_file

        check_output_file(args.out, "a .parquet or .csv file path",
                          {"--input file": args.input, "model": args.model, "dataset": args.dataset})
        check_out_suffix(args.out)
    if args.history:
        histories = [args.history]
        check_histories(histories, where="--history")
    else:
        histories = read_histories(args.input)
    rec = load_recommender(args.model, dataset=getattr(args, "dataset", None), domain=args.domain)
    for line in history_warnings(histories, rec.catalogue()):
        print(f"gdrt recommend: warning: {line}", file=sys.stderr)
    results = rec.recommend(histories, k=args.k)
    if args.history:
        from gdrt_core.text import printable

        for i, (title, score) in enumerate(zip(results[0].titles, results[0].scores, strict=True), start=1):
            print(f"{i:3d}. {score:9.4f}  {printable(title)}")  # catalogue text never drives the terminal
    if not args.out:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(args.input) if args.input else pa.table({"history": pa.array(histories, pa.list_(pa.string()))})
    table = table.append_column("recommendations", pa.array([r.titles for r in results], pa.list_(pa.string())))
    table = table.append_column("scores", pa.array([r.scores for r in results], pa.list_(pa.float32())))
    write_rankings(table, args.out)
    print(f"wrote {len(results)} ranking{'s' if len(results) != 1 else ''} to {args.out}")
