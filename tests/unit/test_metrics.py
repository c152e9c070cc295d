"""Ranking and fairness metrics against hand-computed values (method.md §6).

The toy catalogue used throughout (3 popularity groups, 0 = least popular):

    item  title  popularity  group
    1     A      1           0
    2     B      2           0
    3     C      5           1
    4     D      6           1
    5     E      9           2
    6     F      10          2
    7     C      1           0      shares title C with item 3; item 3 is more popular -> C stands for 3

So 6 distinct titles, and a recommended "C" counts in group 1.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.metrics import (
    METRIC_KEYS,
    MetricsAccumulator,
    TitleCatalogue,
    bootstrap_interval,
    bootstrap_intervals,
    compute_metrics,
    coverage,
    dedupe_ranking,
    example_terms,
    fairness_at_k,
    hit_rate,
    invalid_rate,
    ndcg,
    popular_share,
    resample_weights,
    target_rank,
)

TITLES = {1: "A", 2: "B", 3: "C", 4: "D", 5: "E", 6: "F", 7: "C"}
POPULARITY = {1: 1, 2: 2, 3: 5, 4: 6, 5: 9, 6: 10, 7: 1}
GROUPS = {1: 0, 2: 0, 3: 1, 4: 1, 5: 2, 6: 2, 7: 0}


@pytest.fixture
def catalogue() -> TitleCatalogue:
    return TitleCatalogue.build(TITLES, GROUPS, POPULARITY)


# The four examples of the worked case: returned titles (beam order), target title, history item ids.
RETURNED = [
    ["B", "A", "C", "B", "D"],  # dedupe -> B A C D; target A at rank 1
    ["C", "C", "C", "E", "D"],  # dedupe -> C E D; target E at rank 1 (raw beam position 3)
    ["C", "A"],  # target is item 7, title C: title-level hit at rank 0
    ["D", "E", "Zzz"],  # no hit; "Zzz" is not a catalogue title
]
TARGETS = ["A", "E", "C", "A"]
HISTORIES = [[1, 2, 7], [3, 5], [7], [1, 6, 6]]


def approx(x):
    return pytest.approx(x, rel=1e-9, abs=1e-12)


def test_catalogue_representative_of_a_shared_title(catalogue):
    """C is shared by item 3 (popularity 5, group 1) and item 7 (popularity 1, group 0): C -> item 3.
    Without popularities the higher group wins (still 3); on equal strength the smallest id wins."""
    assert catalogue.item_of_title["C"] == 3 and catalogue.group_of_title("C") == 1
    assert catalogue.size == 6 and catalogue.num_groups == 3
    assert catalogue.group_of_title("Zzz") is None
    assert TitleCatalogue.build(TITLES, GROUPS).item_of_title["C"] == 3
    tied = TitleCatalogue.build({4: "X", 2: "X"}, {4: 1, 2: 1}, {4: 3, 2: 3})
    assert tied.item_of_title["X"] == 2


def test_dedupe_and_rank_with_repeated_titles():
    """Beams C C C E: the ranking keeps the first C, so E is at rank 1, not at its beam position 3."""
    assert dedupe_ranking(["C", "C", "C", "E", "D"]) == ["C", "E", "D"]
    assert target_rank(["C", "C", "C", "E", "D"], "E") == 1
    assert target_rank(["D", "E", "Zzz"], "A") is None
    assert target_rank(["Zzz", "A"], "A") == 1  # an invalid sequence keeps its slot


def test_hit_rate_and_ndcg_at_the_cutoffs():
    """ranks [0, 4, 5, 9, None] (n = 5):
    HR@1 = 1/5; HR@5 = |{0, 4}|/5 = 2/5; HR@10 = |{0, 4, 5, 9}|/5 = 4/5.
    NDCG@1 = (1/log2 2)/5 = 0.2
    NDCG@5 = (1 + 1/log2 6)/5 = (1 + 0.386853)/5 = 0.277371
    NDCG@10 = (1 + 1/log2 6 + 1/log2 7 + 1/log2 11)/5 = (1 + 0.386853 + 0.356207 + 0.289065)/5 = 0.406425"""
    ranks = [0, 4, 5, 9, None]
    assert [hit_rate(ranks, k) for k in (1, 5, 10)] == approx([0.2, 0.4, 0.8])
    assert ndcg(ranks, 1) == approx(0.2)
    assert ndcg(ranks, 5) == approx((1 + 1 / math.log2(6)) / 5)
    assert ndcg(ranks, 5) == pytest.approx(0.277371, abs=1e-6)
    assert ndcg(ranks, 10) == pytest.approx(0.406425, abs=1e-6)


def test_all_hits_and_no_hit(catalogue):
    """All targets at rank 0: HR@K = NDCG@K = 1 for every K. No target anywhere: all 0."""
    all_hits = compute_metrics([["A", "B"], ["E"]], ["A", "E"], [[1], [2]], catalogue)
    no_hit = compute_metrics([["A", "B"], ["E"]], ["F", "D"], [[1], [2]], catalogue)
    for k in (1, 5, 10):
        assert all_hits[f"hr@{k}"] == 1.0 and all_hits[f"ndcg@{k}"] == 1.0
        assert no_hit[f"hr@{k}"] == 0.0 and no_hit[f"ndcg@{k}"] == 0.0


def test_worked_example_ranking_metrics(catalogue):
    """ranks = [1, 1, 0, None], n = 4.
    HR@1 = 1/4; HR@5 = HR@10 = 3/4.
    NDCG@1 = 1/4; NDCG@5 = NDCG@10 = (1/log2 3 + 1/log2 3 + 1/log2 2)/4 = (2 * 0.630930 + 1)/4 = 0.565465.
    Without deduplication, example 2 would sit at rank 3 and NDCG@5 would be
    (0.630930 + 1/log2 5 + 1)/4 = (0.630930 + 0.430677 + 1)/4 = 0.515402."""
    m = compute_metrics(RETURNED, TARGETS, HISTORIES, catalogue)
    assert (m["hr@1"], m["hr@5"], m["hr@10"]) == approx((0.25, 0.75, 0.75))
    assert m["ndcg@1"] == approx(0.25)
    assert m["ndcg@5"] == m["ndcg@10"] == approx((2 / math.log2(3) + 1) / 4)
    assert m["ndcg@5"] == pytest.approx(0.565465, abs=1e-6)
    assert m["n_examples"] == 4


def test_fairness_by_hand_top2(catalogue):
    """K = 2. Deduplicated top-2: [B, A] -> groups 0, 0; [C, E] -> 1, 2; [C, A] -> 1, 0; [D, E] -> 1, 2.
    Pooled counts g0 = 3, g1 = 3, g2 = 2 of 8: GP = [3/8, 3/8, 2/8].
    Histories: [1, 2, 7] -> 0, 0, 0 (item 7 counts with its own group 0); [3, 5] -> 1, 2; [7] -> 0;
    [1, 6, 6] -> 0, 2, 2. Pooled g0 = 5, g1 = 1, g2 = 3 of 9: GH = [5/9, 1/9, 3/9].
    d = [27/72 - 40/72, 27/72 - 8/72, 18/72 - 24/72] = [-13/72, 19/72, -6/72].
    MGU@2 = (13 + 19 + 6)/72/3 = 38/216 = 0.175926;  DGU@2 = 19/72 + 13/72 = 32/72 = 0.444444."""
    f = fairness_at_k(RETURNED, HISTORIES, catalogue, k=2)
    assert f.gp.tolist() == approx([3 / 8, 3 / 8, 2 / 8])
    assert f.gh.tolist() == approx([5 / 9, 1 / 9, 3 / 9])
    assert f.gap.tolist() == approx([-13 / 72, 19 / 72, -6 / 72])
    assert f.mgu == approx(38 / 216)
    assert f.dgu == approx(32 / 72)


def test_worked_example_fairness_coverage_invalid(catalogue):
    """K = 5 (and 10: no deduplicated list is longer than 4). Top-5 catalogue titles:
    [B, A, C, D] -> 0, 0, 1, 1; [C, E, D] -> 1, 2, 1; [C, A] -> 1, 0; [D, E] -> 1, 2 ("Zzz" skipped).
    Pooled g0 = 3, g1 = 6, g2 = 2 of 11: GP = [3/11, 6/11, 2/11]; GH = [5/9, 1/9, 3/9] as above.
    d = [(27 - 55)/99, (54 - 11)/99, (18 - 33)/99] = [-28/99, 43/99, -15/99].
    MGU = (28 + 43 + 15)/99/3 = 86/297 = 0.289562;  DGU = (43 + 28)/99 = 71/99 = 0.717172.
    coverage@10: titles A, B, C, D, E of 6 distinct titles = 5/6.
    invalid_rate: 1 invalid of 5 + 5 + 2 + 3 = 15 returned sequences = 1/15.
    popular share@5: group 2 = 2/11."""
    m = compute_metrics(RETURNED, TARGETS, HISTORIES, catalogue)
    for k in (5, 10):
        assert m[f"mgu@{k}"] == approx(86 / 297)
        assert m[f"dgu@{k}"] == approx(71 / 99)
    assert m["coverage@10"] == approx(5 / 6)
    assert m["invalid_rate"] == approx(1 / 15)
    assert popular_share(RETURNED, 5, catalogue) == approx(2 / 11)
    assert coverage(RETURNED, 1, catalogue) == approx(3 / 6)  # B, C, D
    assert invalid_rate([["A"], []], catalogue) == 0.0


def test_metrics_json_keys_and_ranges(catalogue):
    m = compute_metrics(RETURNED, TARGETS, HISTORIES, catalogue)
    assert tuple(m) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for k, v in m.items() if k != "n_examples")
    extended = compute_metrics(RETURNED, TARGETS, HISTORIES, catalogue, extended=True)
    assert set(METRIC_KEYS) < set(extended)
    assert extended["popular_share@5"] == approx(2 / 11)
    assert [extended[f"gp@5/{g}"] for g in range(3)] == approx([3 / 11, 6 / 11, 2 / 11])
    assert [extended[f"gh/{g}"] for g in range(3)] == approx([5 / 9, 1 / 9, 3 / 9])
    assert extended["mgu@1"] >= 0.0


def test_streaming_accumulator_agrees_with_the_per_metric_functions(catalogue):
    """200 random examples (repeats and invalid titles included): the streamed metrics.json equals the
    per-metric functions applied to the whole list."""
    import random

    rng = random.Random(7)
    vocabulary = ["A", "B", "C", "D", "E", "F", "Zzz"]
    rankings = [[rng.choice(vocabulary) for _ in range(rng.randint(0, 10))] for _ in range(200)]
    targets = [rng.choice(vocabulary[:6]) for _ in range(200)]
    histories = [[rng.choice(list(TITLES)) for _ in range(rng.randint(1, 10))] for _ in range(200)]
    acc = MetricsAccumulator(catalogue)
    ranks = [acc.add(r, t, h) for r, t, h in zip(rankings, targets, histories, strict=True)]
    streamed = acc.result()
    assert ranks == [target_rank(r, t) for r, t in zip(rankings, targets, strict=True)]
    for k in (1, 5, 10):
        assert streamed[f"hr@{k}"] == approx(hit_rate(ranks, k))
        assert streamed[f"ndcg@{k}"] == approx(ndcg(ranks, k))
    for k in (5, 10):
        f = fairness_at_k(rankings, histories, catalogue, k)
        assert (streamed[f"mgu@{k}"], streamed[f"dgu@{k}"]) == approx((f.mgu, f.dgu))
    assert streamed["coverage@10"] == approx(coverage(rankings, 10, catalogue))
    assert streamed["invalid_rate"] == approx(invalid_rate(rankings, catalogue))
    assert streamed == compute_metrics(rankings, targets, histories, catalogue)


def test_misaligned_inputs_are_user_errors(catalogue):
    with pytest.raises(GdrtError, match="one ranking, target and history"):
        compute_metrics(RETURNED, TARGETS[:2], HISTORIES, catalogue)
    with pytest.raises(GdrtError, match="no examples"):
        compute_metrics([], [], [], catalogue)
    with pytest.raises(GdrtError, match="history item 99"):
        compute_metrics([["A"]], ["A"], [[99]], catalogue)


def test_catalogue_from_the_office_dataset(office_dataset):
    """data/office has 2414 items and 3 titles shared by two ids each: 2411 recommendable titles, and each
    shared title stands for its most popular id."""
    from collections import defaultdict

    from gdrt_core.dataset import Dataset

    ds = Dataset(office_dataset)
    cat = TitleCatalogue.from_dataset(ds)
    assert len(ds.titles) == 2414 and cat.size == 2411
    assert cat.num_groups == 5
    items = ds.items
    popularity = dict(
        zip(items.column("item_id").to_pylist(), items.column("popularity").to_pylist(), strict=True)
    )
    ids_of_title = defaultdict(list)
    for item, title in ds.titles.items():
        ids_of_title[title].append(item)
    shared = {t: ids for t, ids in ids_of_title.items() if len(ids) > 1}
    assert len(shared) == 3
    for title, ids in shared.items():
        assert popularity[cat.item_of_title[title]] == max(popularity[i] for i in ids)


def test_most_popular_titles_sums_ids_of_a_title_and_breaks_ties_by_title():
    from gdrt_core.evaluate import most_popular_titles

    titles = {1: "Pen", 2: "Ink", 3: "Pen", 4: "Binder", 5: "Apple", 6: "Desk"}
    counts = {1: 2, 2: 3, 3: 2, 4: 3, 5: 1}  # Pen = 2 + 2 = 4 beats Ink 3; Binder ties Ink, comes first
    assert most_popular_titles(titles, counts, 3) == [("Pen", 4), ("Binder", 3), ("Ink", 3)]
    # an id without a count counts 0, and n larger than the catalogue returns all titles
    assert most_popular_titles(titles, counts, 10)[-2:] == [("Apple", 1), ("Desk", 0)]


def test_bootstrap_interval_of_a_mean_of_two_values_is_hand_derived():
    """Resampling [0, 1] twice gives means 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4: the 95% percentile
    interval is [0, 1]; a statistic that does not depend on the resample has the interval [c, c]; fewer than
    two examples, or a statistic undefined on some resample, have none."""
    values = np.array([0.0, 1.0])
    assert bootstrap_interval(lambda idx: values[idx].mean(axis=1), 2, resamples=4000) == [0.0, 1.0]
    assert bootstrap_interval(lambda idx: np.full(len(idx), 0.25), 5) == [0.25, 0.25]
    assert bootstrap_interval(lambda idx: values[idx].mean(axis=1), 1) is None
    with np.errstate(invalid="ignore"):
        assert bootstrap_interval(lambda idx: values[idx].sum(axis=1) / values[idx].sum(axis=1), 2) is None
    first = bootstrap_interval(lambda idx: values[idx].mean(axis=1), 2, resamples=50, seed=3)
    assert first == bootstrap_interval(lambda idx: values[idx].mean(axis=1), 2, resamples=50, seed=3)


def test_example_terms_give_the_worked_example_and_any_resample(catalogue):
    """Per example: ranks [1, 1, 0, -1]; top-5 groups [2, 2, 0] [0, 2, 1] [1, 1, 0] [0, 1, 1]; history groups
    [3, 0, 0] [0, 1, 1] [1, 0, 0] [1, 0, 2]. All four once: the worked example's metrics. Example 3 twice
    and example 2 not at all (weights [1, 0, 2, 1]): ranks 1, 0, 0, none -> HR@1 = 2/4, NDCG@5 =
    (1/log2 3 + 1 + 1)/4; top-5 counts [2+2+0, 2+2+1, 0+0+1] = [4, 5, 1] of 10, histories [3+2+1, 0, 2] =
    [6, 0, 2] of 8: d = [4/10 - 6/8, 5/10, 1/10 - 2/8] = [-0.35, 0.5, -0.15], MGU@5 = 1.0/3, DGU@5 = 0.85."""
    terms = example_terms(RETURNED, TARGETS, HISTORIES, catalogue)
    assert terms.rank.tolist() == [1, 1, 0, -1]
    assert terms.recommended[5].tolist() == [[2, 2, 0], [0, 2, 1], [1, 1, 0], [0, 1, 1]]
    assert terms.history.tolist() == [[3, 0, 0], [0, 1, 1], [1, 0, 0], [1, 0, 2]]
    m = compute_metrics(RETURNED, TARGETS, HISTORIES, catalogue)
    for name in ("hr@1", "hr@5", "ndcg@5", "ndcg@10", "mgu@5", "dgu@5", "mgu@10", "dgu@10"):
        assert terms.metric(name).tolist() == approx([m[name]])
    weights = resample_weights(np.array([[0, 2, 2, 3], [0, 1, 2, 3]]), 4)
    assert weights.tolist() == [[1, 0, 2, 1], [1, 1, 1, 1]]
    assert terms.metric("hr@1", weights).tolist() == approx([2 / 4, 1 / 4])
    assert terms.metric("ndcg@5", weights)[0] == approx((1 / math.log2(3) + 2) / 4)
    assert terms.metric("mgu@5", weights).tolist() == approx([1.0 / 3, m["mgu@5"]])
    assert terms.metric("dgu@5", weights)[0] == approx(0.85)
    with pytest.raises(GdrtError, match="unknown metric 'mgu@3'"):
        terms.metric("mgu@3")


def test_bootstrap_intervals_share_the_resamples_of_bootstrap_interval():
    """Several statistics at once get, each, the interval bootstrap_interval gives it alone with the same seed
    (the same resampled indices, whatever the chunking), and one None each below two examples."""
    values = np.arange(30.0)
    stats = lambda idx: np.stack([values[idx].mean(axis=1), values[idx].max(axis=1)], axis=1)  # noqa: E731
    both = bootstrap_intervals(stats, 30, resamples=600, seed=5, chunk=7)
    assert both[0] == bootstrap_interval(lambda idx: values[idx].mean(axis=1), 30, resamples=600, seed=5)
    assert both[1] == bootstrap_interval(lambda idx: values[idx].max(axis=1), 30, resamples=600, seed=5)
    assert bootstrap_intervals(stats, 1) == [None, None]

