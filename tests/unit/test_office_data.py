"""The bundled Office Products data (data/office), curated by the session fixture `office_dataset`."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from gdrt_core.dataset import Dataset, train_popularity

OFFICE = Path(__file__).resolve().parents[2] / "data" / "office"
# the published 10,000-window sample, in the shared data folder beside the checkout when there is one
PUBLISHED_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "LBR" / "data" / "Office" / "train_10000.csv"


def test_office_counts(office_dataset):
    ds = Dataset(office_dataset)
    assert ds.manifest["counts"] == {"items": 2414, "train": 15400, "valid": 1925, "test": 1925}
    assert ds.domain == "office"
    assert "office products" in ds.manifest["prompt_template"]


def test_office_every_id_has_a_title(office_dataset):
    ds = Dataset(office_dataset)
    titles = ds.titles
    assert all(isinstance(t, str) and t.strip() for t in titles.values())
    for split in ("train", "valid", "test"):
        t = ds.split(split).to_pydict()
        used = set(t["target"]) | {i for h in t["history"] for i in h}
        assert used <= set(titles), split
        assert max(len(h) for h in t["history"]) <= 10
    # titles as published: HTML entities kept
    assert any("&amp;" in t for t in titles.values())


def test_office_statistics(office_dataset):
    """Numbers of data/office/README.md: users per split, distinct targets, temporal order of splits."""
    ds = Dataset(office_dataset)
    tables = {s: ds.split(s).to_pydict() for s in ("train", "valid", "test")}
    assert [len(set(tables[s]["user_id"])) for s in tables] == [3718, 1277, 1092]
    assert [len(set(tables[s]["target"])) for s in tables] == [1923, 436, 340]
    assert max(tables["train"]["timestamp"]) <= min(tables["valid"]["timestamp"])
    assert max(tables["valid"]["timestamp"]) <= min(tables["test"]["timestamp"])
    # the user sequences rebuilt from all windows: MSL Table 4's 4,895 users / 53,149 interactions
    merged = {k: [v for t in tables.values() for v in t[k]] for k in ("user_id", "history", "target", "timestamp")}
    assert len(set(merged["user_id"])) == 4895
    assert sum(train_popularity(ds.titles, merged).values()) == 53149


def test_office_popularity_groups_are_equal_size(office_dataset):
    """2,414 items in 5 groups: 2414 = 5 * 482 + 4 -> four groups of 483 and one of 482.

    Popularity is the train interactions (each user position once): 41,662 in all.
    """
    ds = Dataset(office_dataset)
    items = ds.items.to_pydict()
    sizes = sorted(sum(1 for g in items["pop_group"] if g == k) for k in range(5))
    assert sizes == [482, 483, 483, 483, 483]
    assert sum(items["popularity"]) == 41662
    by_group = {}
    for p, g in zip(items["popularity"], items["pop_group"], strict=True):
        by_group.setdefault(g, []).append(p)
    assert all(max(by_group[g]) <= min(by_group[g + 1]) for g in range(4))


@pytest.mark.skipif(not PUBLISHED_SAMPLE.is_file(), reason="the published train_10000.csv is not on this machine")
def test_max_train_reproduces_published_sample(tmp_path):
    """--max-train 10000 --seed 42 on train.csv gives the rows of the published train_10000.csv, in order."""
    from gdrt_core.curate import CurateConfig, run

    out = tmp_path / "ds"
    run(CurateConfig(source=str(OFFICE), format="sliding", domain="office", out=str(out), max_train=10000))
    train = Dataset(out).split("train").to_pydict()
    with open(PUBLISHED_SAMPLE, newline="") as f:
        published = list(csv.DictReader(f))
    assert len(published) == len(train["target"]) == 10000
    for row, user, hist, target in zip(published, train["user_id"], train["history"], train["target"], strict=True):
        assert row["user_id"] == user
        assert row["item_ids"] == str([*hist, target])
