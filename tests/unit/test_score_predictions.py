"""`evaluate.score_predictions` / `gdrt score-predictions`: stored rankings scored against a Dataset, by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gdrt_core.cli import main
from gdrt_core.errors import GdrtError
from gdrt_core.evaluate import score_predictions

TITLES = {1: "A", 2: "B", 3: "C", 4: "D", 5: "E"}


def make_dataset(root: Path, popularity: dict[int, int]) -> Path:
    """Five items, one group each (5 groups); test: example 10 (history 1, 2 -> 3), example 11 (history 4 -> 5)."""
    from gdrt_core.dataset import write_dataset

    root.mkdir()
    empty = {"example_id": [], "user_id": [], "history": [], "target": [], "timestamp": []}
    test = {"example_id": [10, 11], "user_id": ["u", "v"], "history": [[1, 2], [4]], "target": [3, 5],
            "timestamp": [1, 2]}
    write_dataset(root, titles=TITLES, splits={"train": empty, "valid": empty, "test": test}, domain="office",
                  popularity=popularity)
    return root


def write_predictions(path: Path, rows: list[tuple[int, int, str]], columns=("example_id", "rank", "title")) -> Path:
    table = pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})
    pq.write_table(table, path)
    return path


RANKED = [(10, 0, "C"), (10, 1, "A"), (11, 1, "E"), (11, 0, "A")]  # example 11's rows out of rank order


def test_metrics_by_hand(tmp_path):
    """Example 10 ranks its target C first, example 11 its target E second: HR@1 1/2, HR@5 1, NDCG@5
    (1 + 1/log2 3) / 2. Popularity 1..5 puts item i in group i - 1: the top-5 groups are C 2, A 0, A 0, E 4
    -> GP [.5, 0, .25, 0, .25]; the histories' 1, 2, 4 -> GH [1/3, 1/3, 0, 1/3, 0]; MGU@5 = mean |GP - GH| =
    (1/6 + 1/3 + 1/4 + 1/3 + 1/4) / 5 = 4/15, DGU@5 = 1/4 + 1/3 = 7/12. With the popularity reversed the
    same rankings put A in the most popular group: popular share 1/2 instead of 1/4, HR and NDCG unchanged."""
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    predictions = write_predictions(tmp_path / "p.parquet", RANKED)
    m = score_predictions(ds, predictions)
    assert m["n_examples"] == 2
    assert m["hr@1"] == 0.5 and m["hr@5"] == 1.0
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    assert m["mgu@5"] == pytest.approx(4 / 15) and m["dgu@5"] == pytest.approx(7 / 12)
    assert [m[f"gp@5/{g}"] for g in range(5)] == pytest.approx([0.5, 0, 0.25, 0, 0.25])
    assert m["popular_share@5"] == pytest.approx(0.25)

    reversed_ds = make_dataset(tmp_path / "reversed", {i: 6 - i for i in TITLES})
    r = score_predictions(reversed_ds, predictions)
    assert {k: r[k] for k in ("hr@1", "hr@5", "ndcg@5")} == {k: m[k] for k in ("hr@1", "hr@5", "ndcg@5")}
    assert r["popular_share@5"] == pytest.approx(0.5)


def test_only_the_examples_of_the_file_are_scored(tmp_path):
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    m = score_predictions(ds, write_predictions(tmp_path / "p.parquet", RANKED[:2]))
    assert m["n_examples"] == 1 and m["hr@1"] == 1.0


@pytest.mark.parametrize("rows, columns, message", [
    ([(12, 0, "A")], ("example_id", "rank", "title"), "1 example id(s) of the predictions are not in the test split"),
    ([(10, 0, "A"), (10, 0, "B")], ("example_id", "rank", "title"), "example 10 has rank 0 twice"),
    ([(10, 0, "A")], ("example_id", "position", "title"), "lack the column(s) rank"),
    ([(10, -1, "A"), (10, -2, "B")], ("example_id", "rank", "title"), "example 10 has the ranks [-2, -1], expected 0..1"),
    ([(10, 0, "A"), (10, 2, "B")], ("example_id", "rank", "title"), "example 10 has the ranks [0, 2], expected 0..1"),
    ([(10, 1, "A")], ("example_id", "rank", "title"), "example 10 has the ranks [1], expected 0..0"),
    ([(10, "0", "A")], ("example_id", "rank", "title"), "column rank holds string, expected integers"),
    ([(10, 0.5, "A")], ("example_id", "rank", "title"), "column rank holds double, expected integers"),
    ([("10", 0, "A")], ("example_id", "rank", "title"), "column example_id holds string, expected integers"),
    ([(10, 0, ["A"])], ("example_id", "rank", "title"), "column title holds list<element: string>, expected strings"),
    ([(10, 0, None), (11, 0, "A")], ("example_id", "rank", "title"), "column title has 1 null value(s)"),
    ([(10, None, "A"), (11, 0, "A")], ("example_id", "rank", "title"), "column rank has 1 null value(s)"),
    ([], ("example_id", "rank", "title"), "the predictions file has no rows"),
])
def test_bad_predictions_are_errors_naming_the_file(tmp_path, rows, columns, message):
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    if rows:
        path = write_predictions(tmp_path / "p.parquet", rows, columns)
    else:  # typed, empty
        path = tmp_path / "p.parquet"
        pq.write_table(pa.table({"example_id": pa.array([], pa.int64()), "rank": pa.array([], pa.int8()),
                                 "title": pa.array([], pa.string())}), path)
    with pytest.raises(GdrtError, match="p.parquet") as e:
        score_predictions(ds, path)
    assert message in str(e.value)


def test_missing_or_unreadable_file(tmp_path):
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    with pytest.raises(GdrtError, match="no such predictions file"):
        score_predictions(ds, tmp_path / "absent.parquet")
    (tmp_path / "text.parquet").write_text("not parquet")
    with pytest.raises(GdrtError, match="not a readable parquet file"):
        score_predictions(ds, tmp_path / "text.parquet")
    # a readable footer over a corrupt data page
    good = write_predictions(tmp_path / "good.parquet", RANKED * 200)
    data = bytearray(good.read_bytes())
    data[4:len(data) // 2] = bytes(len(data) // 2 - 4)
    (tmp_path / "corrupt.parquet").write_bytes(bytes(data))
    with pytest.raises(GdrtError, match="corrupt.parquet"):
        score_predictions(ds, tmp_path / "corrupt.parquet")


def eval_dir(root: Path, rows, split: str, split_sha256: str) -> Path:
    """An Eval directory as far as the scoring reads it: predictions.parquet and the manifest's `ranked`."""
    from gdrt_core.artifacts import write_manifest

    root.mkdir()
    write_predictions(root / "predictions.parquet", rows)
    write_manifest(root, "eval", ranked={"split": split, "split_sha256": split_sha256})
    return root


def test_an_eval_directory_gives_its_split_and_must_match_the_dataset(tmp_path):
    """The Eval manifest's `ranked` gives the default split, and a ranked split file other than the dataset's
    (another curation: the example ids would name other windows) is refused; the same windows with other
    popularity groups are not another split."""
    from gdrt_core.dataset import Dataset

    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    sha = Dataset(ds).manifest["files"]["test.parquet"]["sha256"]
    same = eval_dir(tmp_path / "same", RANKED, "test", sha)
    assert score_predictions(ds, same)["scored"]["split"] == "test"
    assert score_predictions(make_dataset(tmp_path / "reversed", {i: 6 - i for i in TITLES}), same)["n_examples"] == 2
    other = eval_dir(tmp_path / "other", RANKED, "test", "0" * 64)
    with pytest.raises(GdrtError, match="the predictions rank another test split than") as e:
        score_predictions(ds, other)
    assert "other" in str(e.value)
    from gdrt_core.evaluate import compare_predictions

    with pytest.raises(GdrtError, match="A ranked the valid split .* and B the test split"):
        compare_predictions(ds, eval_dir(tmp_path / "a-valid", RANKED, "valid", "0" * 64), same)
    valid = eval_dir(tmp_path / "valid", RANKED, "valid", "0" * 64)
    with pytest.raises(GdrtError, match="the valid split has no examples"):
        score_predictions(ds, valid)


def test_command_prints_and_writes_the_metrics(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    predictions = write_predictions(tmp_path / "p.parquet", RANKED)
    out = tmp_path / "m.json"
    assert main(["score-predictions", "--dataset", str(ds), "--predictions", str(predictions), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text()) == score_predictions(ds, predictions)
    assert main(["score-predictions", "--dataset", str(ds), "--predictions", str(predictions), "--split", "valid"]) != 0
    assert "the valid split has no examples to score predictions against" in capsys.readouterr().err


OTHER = [(10, 0, "B"), (10, 1, "A"), (11, 0, "E"), (11, 1, "D")]  # misses example 10, ranks example 11's E first


def test_compare_predictions_by_hand(tmp_path):
    """A = RANKED (hits both, ranks 0 and 1), B = OTHER (hits example 11 at rank 0). HR@10 1 vs 1/2; NDCG@10
    (1 + 1/log2 3)/2 vs 1/2. B's top-5 groups 1, 0, 4, 3 -> GP [1/4, 1/4, 0, 1/4, 1/4], GH [1/3, 1/3, 0, 1/3, 0]
    -> MGU@5 (3/12 + 1/4)/5 = 1/10, DGU@5 1/4 + 1/12 = 1/3; A's 4/15 (above). Resampling two examples: both
    example 10 (HR@10 difference 1), both 11 (0) or one of each (1/2): the 95% interval is [0, 1]."""
    from gdrt_core.evaluate import compare_predictions, format_predictions_comparison

    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    a = write_predictions(tmp_path / "a.parquet", RANKED)
    b = write_predictions(tmp_path / "b.parquet", OTHER)
    r = compare_predictions(ds, a, b, resamples=4000)
    assert r["examples"] == 2 and r["split"] == "test"
    assert (r["a"]["hr@10"], r["b"]["hr@10"]) == (1.0, 0.5)
    assert r["a"]["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2) and r["b"]["ndcg@10"] == pytest.approx(0.5)
    assert r["b"]["mgu@5"] == pytest.approx(0.1) and r["b"]["dgu@5"] == pytest.approx(1 / 3)
    assert r["difference"]["mgu@5"]["value"] == pytest.approx(4 / 15 - 0.1)
    assert r["difference"]["hr@10"] == {"value": 0.5, "relative": 1.0, "ci95": [0.0, 1.0]}
    assert r["hits@10"] == {"both": 1, "only_a": 1, "only_b": 0}
    assert {k: r["a"][k] for k in ("hr@5", "ndcg@5", "mgu@5", "dgu@5")} == pytest.approx(
        {k: score_predictions(ds, a)[k] for k in ("hr@5", "ndcg@5", "mgu@5", "dgu@5")})
    text = format_predictions_comparison(r)
    assert "A - B on the same 2 test examples" in text and "hr@10    +0.5000 (+0.0000, +1.0000) +100.0%" in text
    assert "hits in the top 10: both 1, only A 1, only B 0" in text


def test_compare_predictions_needs_the_same_examples(tmp_path, capsys):
    ds = make_dataset(tmp_path / "ds", {i: i for i in TITLES})
    a = write_predictions(tmp_path / "a.parquet", RANKED)
    b = write_predictions(tmp_path / "b.parquet", OTHER[:2])
    assert main(["compare-predictions", str(a), str(b), "--dataset", str(ds)]) != 0
    assert "rank different examples (2 and 1, 1 in both)" in capsys.readouterr().err
    assert main(["compare-predictions", str(a), str(b), "--dataset", str(ds), "--resamples", "5"]) != 0
    assert "--resamples must be between 100 and 1,000,000" in capsys.readouterr().err
    top1 = write_predictions(tmp_path / "top1.parquet", [(10, 0, "C"), (11, 0, "A")])
    assert main(["compare-predictions", str(a), str(top1), "--dataset", str(ds)]) != 0
    assert "returns up to 2 titles per example and" in capsys.readouterr().err
    assert main(["compare-predictions", str(a), str(b), "--dataset", str(ds), "--resamples", "5"]) != 0
    assert "--resamples must be between 100 and 1,000,000" in capsys.readouterr().err
    out = tmp_path / "cmp.json"
    b = write_predictions(tmp_path / "b.parquet", OTHER)
    assert main(["compare-predictions", str(a), str(b), "--dataset", str(ds), "--resamples", "200", "--out", str(out)]) == 0
    assert "hits in the top 10: both 1, only A 1, only B 0" in capsys.readouterr().out
    assert json.loads(out.read_text())["hits@10"] == {"both": 1, "only_a": 1, "only_b": 0}
