"""`gdrt recommend` holds history titles to the curation text rules and never prints raw control characters."""

from __future__ import annotations

import argparse

import pytest

from gdrt_core import recommend
from gdrt_core.errors import GdrtError
from gdrt_core.recommend import Recommendation, check_history_text


@pytest.mark.parametrize(
    ("title", "fragment"),
    [("Red\x1b[31m", "control character"), ("a\x00b", "control character"), ("Pen \ud83d", "invalid Unicode"),
     ("\udcff", "non-UTF-8 bytes")],
)
def test_history_titles_with_bad_text_are_refused(title, fragment):
    with pytest.raises(GdrtError, match=fragment) as err:
        check_history_text([["Desk Lamp"], ["Desk Lamp", title]])
    assert "history 1, title 1" in str(err.value)
    assert "\x1b" not in str(err.value) and "\x00" not in str(err.value)


def test_ordinary_titles_pass():
    check_history_text([["Desk Lamp", "Rubbermaid Step Stool - 12 in\n31 cm", "Ünïcödé\tx"]])


class _FakeRecommender:
    def catalogue(self):
        return {"Desk Lamp"}

    def recommend(self, histories, k=10):
        return [Recommendation(["\x1b[2JWiped", "Bell\x07", "Two\nlines", "Plain"][:k], [-1.0, -2.0, -3.0, -4.0][:k])]


def test_printed_recommendations_have_no_control_characters(monkeypatch, capsys):
    monkeypatch.setattr(recommend, "load_recommender", lambda *a, **kw: _FakeRecommender())
    args = argparse.Namespace(history=["Desk Lamp"], input=None, model="m", dataset=None, domain=None, k=4, out=None)
    recommend.cli(args)
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07")
    lines = out.splitlines()
    assert len(lines) == 4
    assert lines[0].endswith("\\x1b[2JWiped") and lines[2].endswith("Two\\nlines")


def test_a_model_path_under_the_home_directory_is_expanded(tmp_path, monkeypatch):
    """`--model ~/models/x` (quoted, so the shell left the ~) loads the directory under $HOME."""
    (tmp_path / "models" / "x").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = []
    monkeypatch.setattr(recommend.Recommender, "load", classmethod(lambda cls, path, **kw: seen.append(path)))
    recommend.load_recommender("~/models/x")
    assert seen == [str(tmp_path / "models" / "x")]


def test_k_above_the_catalogue_is_refused():
    """k is the beam width: --k 100000 on a 3-title catalogue grew to gigabytes before it was refused."""
    from types import SimpleNamespace

    recommender = recommend.Recommender.__new__(recommend.Recommender)  # the check comes before any model work
    recommender.trie = SimpleNamespace(trie=SimpleNamespace(titles=("A", "B", "C")))  # one per distinct title
    with pytest.raises(GdrtError, match="k=4 is more than the 3 distinct titles of the catalogue"):
        recommender.recommend([["A"]], k=4)


def test_the_popularity_baseline_refuses_k_above_the_catalogue_too():
    """baseline:most-popular returned every title silently where a model refused k above the catalogue."""
    baseline = recommend.PopularityRecommender({1: "A", 2: "B", 3: "B"}, {1: 5, 2: 3, 3: 1})
    assert baseline.catalogue() == {"A", "B"}
    assert baseline.recommend([["A"]], k=2)[0].titles == ["A", "B"]
    with pytest.raises(GdrtError, match="k=3 is more than the 2 distinct titles of the catalogue"):
        baseline.recommend([["A"]], k=3)


def test_histories_outside_the_catalogue_or_empty_are_warned_about(monkeypatch, capsys):
    """A history of unknown titles (a typo, another catalogue) or an empty one was ranked without a word."""
    lines = recommend.history_warnings([["Desk Lamp", "Stapler?"], [], ["Stapler?", "Pen"]], {"Desk Lamp", "Pen"})
    assert lines == ["1 of 3 histories are empty (rows 1): their ranking does not depend on the user",
                     "2 of 4 history titles are not in the catalogue ('Stapler?'): the model reads them as text, "
                     "not as items it was trained on"]
    assert recommend.history_warnings([["Desk Lamp"]], {"Desk Lamp"}) == []
    monkeypatch.setattr(recommend, "load_recommender", lambda *a, **kw: _FakeRecommender())
    args = argparse.Namespace(history=["Desk Lamp", "Unknown"], input=None, model="m", dataset=None, domain=None,
                              k=1, out=None)
    recommend.cli(args)
    err = capsys.readouterr().err
    assert "warning: 1 of 2 history titles are not in the catalogue ('Unknown')" in err
