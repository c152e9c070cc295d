"""Ranking and fairness metrics of the evaluate stage (method.md §6), as pure functions.

Input per evaluated example: the titles the model returned, in beam order, and the target's title.

Ranking. Hits are title-level: several item ids may share a title, and a generative recommender can only
name the title. A ranking keeps the first beam of each title (`dedupe_ranking`); a returned sequence that
is not a catalogue title keeps its slot (it is a wasted recommendation) but never matches a target.
rank = 0-based position of the target title in the deduplicated ranking, None when absent.

    HR@K   = mean_examples 1[rank < K]
    NDCG@K = mean_examples 1[rank < K] / log2(rank + 2)        (one relevant item per example)

Fairness over the items' popularity groups (pop_group of items.parquet, 0 = least popular):

    GP_g = #(top-K recommendations in group g) / #(top-K recommendations), pooled over the examples
    GH_g = #(history items in group g) / #(history items), pooled over the evaluated examples
    d_g  = GP_g - GH_g;   MGU@K = mean_g |d_g|  (over all groups);   DGU@K = max_g d_g - min_g d_g

Only catalogue titles count as recommendations in GP (GP sums to 1 when there is any); a history item
occurs once per example window it appears in.

Titles shared by several ids. A recommended title stands for one item, its representative: the most
popular of the ids with that title (training interactions; ties to the smallest id). GP, coverage and the
popular share use the representative's popularity group; history items count with their own id's group.
The catalogue therefore has one recommendable item per distinct title, and coverage@K = distinct
catalogue titles in the top-K lists / distinct catalogue titles.

`compute_metrics` gives metrics.json for a list of examples; `MetricsAccumulator` gives the same while
predictions stream in batch by batch; `example_terms` keeps each example's terms so that resamples of the
examples (`bootstrap_interval`, the paired comparison of two models' rankings) get the same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from gdrt_core.errors import GdrtError

RANK_KS = (1, 5, 10)
FAIRNESS_KS = (5, 10)
COVERAGE_K = 10
METRIC_KEYS = (
    "hr@1", "hr@5", "hr@10", "ndcg@1", "ndcg@5", "ndcg@10",
    "mgu@5", "dgu@5", "mgu@10", "dgu@10", "coverage@10", "invalid_rate", "n_examples",
)  # fmt: skip


# --- the catalogue: titles -> items -> popularity groups ---------------------------------------------


@dataclass(frozen=True)
class TitleCatalogue:
    """Which item (and popularity group) a recommended title stands for.

    item_of_title: title -> representative item id (the most popular id with that title, ties to the
    smallest id); group_of_item: item id -> popularity group, for every item; num_groups: number of
    popularity groups (group num_groups - 1 is the most popular).
    """

    item_of_title: Mapping[str, int]
    group_of_item: Mapping[int, int]
    num_groups: int

    @classmethod
    def build(
        cls,
        titles: Mapping[int, str],
        pop_groups: Mapping[int, int],
        popularity: Mapping[int, int] | None = None,
        num_groups: int | None = None,
    ) -> TitleCatalogue:
        """From item id -> title, item id -> pop group and (optionally) item id -> training popularity.

        Without `popularity` the representative is the id in the highest popularity group (ties to the
        smallest id).
        """
        missing = [i for i in titles if i not in pop_groups]
        if missing:
            raise GdrtError(
                f"{len(missing)} item(s) have a title but no popularity group, e.g. item {missing[0]}",
                hint="build the catalogue from one items table (items.parquet)",
            )
        strength = popularity if popularity is not None else pop_groups
        item_of_title: dict[str, int] = {}
        for item in sorted(titles):
            title = titles[item]
            best = item_of_title.get(title)
            if best is None or strength.get(item, 0) > strength.get(best, 0):
                item_of_title[title] = item
        if num_groups is None:
            num_groups = (max(pop_groups.values()) + 1) if pop_groups else 1
        return cls(item_of_title=item_of_title, group_of_item=dict(pop_groups), num_groups=num_groups)

    @classmethod
    def from_dataset(cls, dataset, num_groups: int | None = None) -> TitleCatalogue:
        """From a `gdrt_core.dataset.Dataset` (its items.parquet: title, popularity, pop_group)."""
        items = dataset.items
        ids = items.column("item_id").to_pylist()
        popularity = dict(zip(ids, items.column("popularity").to_pylist(), strict=True))
        return cls.build(dataset.titles, dataset.pop_groups, popularity, num_groups)

    @property
    def size(self) -> int:
        """Number of recommendable items: distinct titles."""
        return len(self.item_of_title)

    def __contains__(self, title: object) -> bool:
        return title in self.item_of_title

    def group_of_title(self, title: str) -> int | None:
        item = self.item_of_title.get(title)
        return None if item is None else self.group_of_item[item]


# --- ranking -----------------------------------------------------------------------------------------


def dedupe_ranking(returned: Sequence[str]) -> list[str]:
    """Keep the first occurrence of each title, in beam order."""
    return list(dict.fromkeys(returned))


def target_rank(returned: Sequence[str], target_title: str) -> int | None:
    """0-based position of the target title in the deduplicated ranking; None when it is not there."""
    for position, title in enumerate(dedupe_ranking(returned)):
        if title == target_title:
            return position
    return None


def hit_rate(ranks: Sequence[int | None], k: int) -> float:
    """HR@K = mean 1[rank < K] (None = no hit)."""
    if not ranks:
        return 0.0
    return sum(1 for r in ranks if r is not None and r < k) / len(ranks)


def ndcg(ranks: Sequence[int | None], k: int) -> float:
    """NDCG@K = mean 1[rank < K] / log2(rank + 2): one relevant item, so the ideal DCG is 1."""
    if not ranks:
        return 0.0
    return sum(1.0 / math.log2(r + 2) for r in ranks if r is not None and r < k) / len(ranks)


# --- fairness ----------------------------------------------------------------------------------------


def group_shares(groups: Sequence[int], num_groups: int) -> np.ndarray:
    """Share of each group among `groups` ([num_groups], zeros when `groups` is empty)."""
    counts = np.bincount(np.asarray(groups, dtype=np.int64), minlength=num_groups).astype(np.float64)
    if counts.shape[0] > num_groups:
        raise GdrtError(f"popularity group {counts.shape[0] - 1} outside 0..{num_groups - 1}")
    total = counts.sum()
    return counts / total if total > 0 else counts


@dataclass(frozen=True)
class Fairness:
    """Exposure of popularity groups in the top-K vs in the histories, and the MGU/DGU summaries."""

    k: int
    gp: np.ndarray  # [num_groups] share of each group among top-K recommendations
    gh: np.ndarray  # [num_groups] share of each group among history items
    mgu: float
    dgu: float

    @property
    def gap(self) -> np.ndarray:
        return self.gp - self.gh  # [num_groups] d_g


def recommended_groups(rankings: Sequence[Sequence[str]], k: int, catalogue: TitleCatalogue) -> list[int]:
    """Popularity groups of the catalogue titles in every example's deduplicated top-K, pooled."""
    out = []
    for returned in rankings:
        for title in dedupe_ranking(returned)[:k]:
            group = catalogue.group_of_title(title)
            if group is not None:
                out.append(group)
    return out


def history_groups(histories: Sequence[Sequence[int]], catalogue: TitleCatalogue) -> list[int]:
    """Popularity groups of all history items of the evaluated examples, pooled (with repeats)."""
    try:
        return [catalogue.group_of_item[item] for history in histories for item in history]
    except KeyError as e:
        raise GdrtError(
            f"history item {e.args[0]} is not in the catalogue", hint="use the dataset's items table"
        ) from None


def fairness_at_k(
    rankings: Sequence[Sequence[str]],
    histories: Sequence[Sequence[int]],
    catalogue: TitleCatalogue,
    k: int,
) -> Fairness:
    """GP, GH, MGU@K = mean_g |GP_g - GH_g| and DGU@K = max_g d_g - min_g d_g."""
    gp, gh, mgu, dgu = fairness_of_counts(group_shares(recommended_groups(rankings, k, catalogue), catalogue.num_groups),
                                          group_shares(history_groups(histories, catalogue), catalogue.num_groups))
    return Fairness(k=k, gp=gp, gh=gh, mgu=float(mgu), dgu=float(dgu))


# --- catalogue-level rates ---------------------------------------------------------------------------


def coverage(rankings: Sequence[Sequence[str]], k: int, catalogue: TitleCatalogue) -> float:
    """Distinct catalogue titles recommended in any top-K / number of distinct catalogue titles."""
    seen = {t for returned in rankings for t in dedupe_ranking(returned)[:k] if t in catalogue}
    return len(seen) / catalogue.size if catalogue.size else 0.0


def invalid_rate(rankings: Sequence[Sequence[str]], catalogue: TitleCatalogue) -> float:
    """Share of all returned sequences (before deduplication) that are not catalogue titles."""
    total = sum(len(returned) for returned in rankings)
    invalid = sum(1 for returned in rankings for t in returned if t not in catalogue)
    return invalid / total if total else 0.0


def popular_share(rankings: Sequence[Sequence[str]], k: int, catalogue: TitleCatalogue) -> float:
    """Share of the most popular group (num_groups - 1) among the top-K recommendations."""
    return float(group_shares(recommended_groups(rankings, k, catalogue), catalogue.num_groups)[-1])


# --- everything metrics.json holds -------------------------------------------------------------------


class MetricsAccumulator:
    """Streams examples in (`add`) and gives the metrics.json dict (`result`), in memory bounded by the
    catalogue size, so the evaluate stage can score predictions batch by batch.

    Same definitions as the functions above; `compute_metrics` is this over a whole list.
    """

    def __init__(self, catalogue: TitleCatalogue, *, extended: bool = False):
        self.catalogue = catalogue
        self.extended = extended
        self.fairness_ks = RANK_KS if extended else FAIRNESS_KS
        self.coverage_ks = (5, COVERAGE_K) if extended else (COVERAGE_K,)
        g = catalogue.num_groups
        self.n_examples = 0
        self.hits = dict.fromkeys(RANK_KS, 0)
        self.dcg = dict.fromkeys(RANK_KS, 0.0)
        self.recommended = {k: np.zeros(g, dtype=np.int64) for k in self.fairness_ks}  # [G] per K
        self.history = np.zeros(g, dtype=np.int64)  # [G]
        self.covered: dict[int, set[str]] = {k: set() for k in self.coverage_ks}
        self.returned = 0
        self.invalid = 0

    def add(self, returned: Sequence[str], target_title: str, history: Sequence[int]) -> int | None:
        """Add one example; returns the target's rank (None = no hit)."""
        cat = self.catalogue
        ranking = dedupe_ranking(returned)
        rank, recommended, history_counts = _terms(ranking, target_title, history, cat, self.fairness_ks)
        self.n_examples += 1
        for k in RANK_KS:
            if rank is not None and rank < k:
                self.hits[k] += 1
                self.dcg[k] += 1.0 / math.log2(rank + 2)
        for k in self.fairness_ks:
            self.recommended[k] += recommended[k]
        for k in self.coverage_ks:
            self.covered[k].update(t for t in ranking[:k] if t in cat)
        self.history += history_counts
        self.returned += len(returned)
        self.invalid += sum(1 for t in returned if t not in cat)
        return rank

    def fairness(self, k: int) -> Fairness:
        gp, gh, mgu, dgu = fairness_of_counts(self.recommended[k], self.history)
        return Fairness(k=k, gp=gp, gh=gh, mgu=float(mgu), dgu=float(dgu))

    def result(self) -> dict[str, float | int]:
        if self.n_examples == 0:
            raise GdrtError("no examples to evaluate", hint="check the split and --limit")
        n = self.n_examples
        metrics: dict[str, float | int] = {}
        for k in RANK_KS:
            metrics[f"hr@{k}"] = self.hits[k] / n
        for k in RANK_KS:
            metrics[f"ndcg@{k}"] = self.dcg[k] / n
        fairness = {k: self.fairness(k) for k in self.fairness_ks}
        for k in FAIRNESS_KS:
            metrics[f"mgu@{k}"] = fairness[k].mgu
            metrics[f"dgu@{k}"] = fairness[k].dgu
        size = self.catalogue.size
        metrics[f"coverage@{COVERAGE_K}"] = len(self.covered[COVERAGE_K]) / size if size else 0.0
        metrics["invalid_rate"] = self.invalid / self.returned if self.returned else 0.0
        metrics["n_examples"] = n
        if self.extended:
            for k in RANK_KS:
                if k not in FAIRNESS_KS:
                    metrics[f"mgu@{k}"] = fairness[k].mgu
                    metrics[f"dgu@{k}"] = fairness[k].dgu
            metrics["coverage@5"] = len(self.covered[5]) / size if size else 0.0
            for k in FAIRNESS_KS:
                metrics[f"popular_share@{k}"] = float(fairness[k].gp[-1])
                for g in range(self.catalogue.num_groups):
                    metrics[f"gp@{k}/{g}"] = float(fairness[k].gp[g])
            for g in range(self.catalogue.num_groups):
                metrics[f"gh/{g}"] = float(fairness[FAIRNESS_KS[0]].gh[g])
        return metrics


def fairness_of_counts(recommended: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, ...]:
    """GP, GH [..., G], MGU, DGU [...] from pooled group counts [..., G] (any leading shape, e.g. one row per
    bootstrap resample): GP and GH are the counts' shares (zeros where a row has none)."""
    gp, gh = _shares(recommended), _shares(history)
    gap = gp - gh
    return gp, gh, np.abs(gap).mean(axis=-1), gap.max(axis=-1) - gap.min(axis=-1)


def _shares(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def _terms(ranking: list[str], target_title: str, history: Sequence[int], catalogue: TitleCatalogue,
           ks: Sequence[int]) -> tuple[int | None, dict[int, np.ndarray], np.ndarray]:
    """One example's terms: the target's rank in the deduplicated `ranking` (None = absent), the counts of the
    popularity groups of its catalogue titles in the top K for each K [G], of its history items [G]."""
    g = catalogue.num_groups
    rank = next((pos for pos, title in enumerate(ranking) if title == target_title), None)
    groups = [catalogue.group_of_title(t) for t in ranking[:max(ks, default=0)]]
    recommended = {k: np.bincount([x for x in groups[:k] if x is not None], minlength=g)[:g] for k in ks}
    return rank, recommended, np.bincount(history_groups([history], catalogue), minlength=g)[:g]


@dataclass(frozen=True)
class ExampleTerms:
    """Per-example terms of the ranking and fairness metrics, so that the metrics of any resample of the
    examples (a bootstrap) are sums over rows: n examples, G popularity groups."""

    rank: np.ndarray  # [n] int64, the target's 0-based rank in the deduplicated ranking, -1 = absent
    recommended: dict[int, np.ndarray]  # K -> [n, G] counts (float64) of the groups of the catalogue titles in the top K
    history: np.ndarray  # [n, G] counts (float64) of the groups of the history items

    def __len__(self) -> int:
        return len(self.rank)

    def metric(self, name: str, weights: np.ndarray | None = None) -> np.ndarray:
        """`name` (hr@K, ndcg@K, mgu@K, dgu@K) of each resample: weights [r, n] = how often each example is in
        resample r (None: every example once). [r] (or [1])"""
        kind, k = name.split("@")
        k = int(k)
        w = np.ones((1, len(self))) if weights is None else weights
        if kind in ("hr", "ndcg"):
            hit = (self.rank >= 0) & (self.rank < k)
            gain = hit.astype(np.float64)
            if kind == "ndcg":
                gain[hit] = 1.0 / np.log2(self.rank[hit] + 2)
            return (w @ gain) / w.sum(axis=1)
        if kind in ("mgu", "dgu") and k in self.recommended:
            _, _, mgu, dgu = fairness_of_counts(w @ self.recommended[k], w @ self.history)
            return mgu if kind == "mgu" else dgu
        raise GdrtError(f"unknown metric {name!r}",
                        hint=f"use hr@K or ndcg@K, or mgu@K / dgu@K with K in {sorted(self.recommended)}")


def example_terms(
    rankings: Sequence[Sequence[str]], targets: Sequence[str], histories: Sequence[Sequence[int]],
    catalogue: TitleCatalogue, ks: Sequence[int] = FAIRNESS_KS,
) -> ExampleTerms:
    """The `ExampleTerms` of evaluated examples (the arguments of `compute_metrics`; the same rules)."""
    rows = [_terms(dedupe_ranking(r), t, h, catalogue, ks) for r, t, h in zip(rankings, targets, histories, strict=True)]
    g = catalogue.num_groups
    return ExampleTerms(
        rank=np.array([-1 if rank is None else rank for rank, _, _ in rows], dtype=np.int64),
        recommended={k: np.array([rec[k] for _, rec, _ in rows], dtype=np.float64).reshape(len(rows), g) for k in ks},
        history=np.array([his for _, _, his in rows], dtype=np.float64).reshape(len(rows), g),
    )


def resample_weights(idx: np.ndarray, n: int) -> np.ndarray:
    """How often each of n examples occurs in each resample: idx [r, n] of example indices -> [r, n] float."""
    r = idx.shape[0]
    flat = (idx + np.arange(r)[:, None] * n).ravel()
    return np.bincount(flat, minlength=r * n).reshape(r, n).astype(np.float64)


BOOTSTRAP_CELLS = 1 << 22  # resampled indices held at once (chunk x n), about 32 MB of int64


def bootstrap_interval(statistic: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = 2000,
                       seed: int = 0, level: float = 0.95, chunk: int = 250) -> list[float] | None:
    """Percentile bootstrap interval over n examples (Efron & Tibshirani, An Introduction to the Bootstrap,
    1993, ch. 13): `statistic(idx)` maps resampled example indices idx [r, n] (int) to one value per resample
    [r]; returns [low, high] at `level`, or None when n < 2 or the statistic is undefined (nan) on a resample.
    Deterministic for a seed; memory is at most chunk x n indices at a time."""
    return bootstrap_intervals(lambda idx: statistic(idx)[:, None], n, resamples=resamples, seed=seed,
                               level=level, chunk=chunk)[0]


def bootstrap_intervals(statistics: Callable[[np.ndarray], np.ndarray], n: int, *, resamples: int = 2000,
                        seed: int = 0, level: float = 0.95, chunk: int = 250) -> list[list[float] | None]:
    """`bootstrap_interval` of m statistics over the same resamples: `statistics(idx)` maps idx [r, n] to
    [r, m]; one [low, high] (or None) per statistic. The resamples are those of `bootstrap_interval` with the
    same seed; chunks hold at most BOOTSTRAP_CELLS indices (fewer rows for large n)."""
    if n < 2:
        return [None] * np.shape(statistics(np.zeros((1, n), dtype=np.int64)))[1]
    rng = np.random.default_rng(seed)
    rows = max(1, min(chunk, BOOTSTRAP_CELLS // n))
    values = np.concatenate([statistics(rng.integers(0, n, size=(min(rows, resamples - start), n)))
                             for start in range(0, resamples, rows)])  # [resamples, m]
    tail = 50.0 * (1.0 - level)
    return [[float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail))] if np.all(np.isfinite(v)) else None
            for v in values.T]


def compute_metrics(
    rankings: Sequence[Sequence[str]],
    targets: Sequence[str],
    histories: Sequence[Sequence[int]],
    catalogue: TitleCatalogue,
    *,
    extended: bool = False,
) -> dict[str, float | int]:
    """The metrics.json dict (keys METRIC_KEYS) for one evaluated split.

    rankings: per example, the returned titles in beam order; targets: per example, the target title;
    histories: per example, the history item ids. With `extended`, also hr/ndcg/mgu/dgu at the other
    K, coverage@5, popular_share@5/@10 and per-group gp@K/g, gh/g.
    """
    if not (len(rankings) == len(targets) == len(histories)):
        raise GdrtError(
            f"{len(rankings)} rankings, {len(targets)} targets and {len(histories)} histories",
            hint="pass one ranking, target and history per evaluated example",
        )
    acc = MetricsAccumulator(catalogue, extended=extended)
    for returned, target, history in zip(rankings, targets, histories, strict=True):
        acc.add(returned, target, history)
    return acc.result()
