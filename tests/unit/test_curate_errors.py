"""Bad input: a message naming file, line and problem, exit code 2, and no output directory left behind.

Each case copies a hand-made fixture, breaks one thing, and runs `gdrt curate` through `cli.main`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gdrt_core.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "curate"
RAW_SETTINGS = ["--set", "k_core=2", "--set", "max_history=3", "--set", "valid_fraction=0.25", "--set", "test_fraction=0.25"]


def copy_fixture(tmp_path: Path, name: str) -> Path:
    src = tmp_path / "src" / name
    shutil.copytree(FIXTURES / name, src)
    return src


def curate(tmp_path: Path, source: Path, fmt: str, *extra: str) -> tuple[int, Path]:
    out = tmp_path / "out" / "dataset"
    code = main(["curate", "--source", str(source), "--format", fmt, "--domain", "office", "--out", str(out), *extra])
    return code, out


def expect_error(tmp_path, capsys, source, fmt, fragments, *extra) -> str:
    code, out = curate(tmp_path, source, fmt, *extra)
    err = capsys.readouterr().err
    assert code == 2, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    assert not out.exists()
    leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
    assert leftovers == [], leftovers
    return err


def replace_line(path: Path, lineno: int, new: bytes) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] = new
    path.write_bytes(b"\n".join(lines))


# ---- sliding -----------------------------------------------------------------------------------

SLIDING_CSV_CASES = {
    "wrong field count": (b'1,"[1, 2, 3]"', ["train.csv, line 2", "malformed CSV", "expected 3 fields, found 2"]),
    "item_ids not a list": (b'1,"1, 2, 3",100', ["train.csv, line 2", "malformed row", "list of item ids"]),
    "non-integer id": (b'1,"[1, x]",100', ["train.csv, line 2", "malformed row", "integer item ids"]),
    "bad timestamp": (b'1,"[1, 2]",yesterday', ["train.csv, line 2", "timestamp 'yesterday' is not an integer"]),
    "unknown item id": (b'1,"[1, 99]",100', ["train.csv, line 2", "unknown item id", "item id 99"]),
    "empty id list": (b'1,[],100', ["train.csv, line 2", "item_ids is empty"]),
    "non-UTF-8 bytes": (b'1,"[1, 2]",100,\xff\xfe', ["train.csv, line 2", "non-UTF-8 bytes"]),
}


@pytest.mark.parametrize("case", sorted(SLIDING_CSV_CASES))
def test_sliding_bad_csv_row(tmp_path, capsys, case):
    line, fragments = SLIDING_CSV_CASES[case]
    src = copy_fixture(tmp_path, "sliding")
    replace_line(src / "train.csv", 2, line)
    err = expect_error(tmp_path, capsys, src, "sliding", fragments)
    assert "--on-bad-rows drop" in err


def test_sliding_history_longer_than_allowed(tmp_path, capsys):
    """train.csv line 4 is [1, 2, 3, 4]: a history of 3 > max_history=2 (the first such row)."""
    src = copy_fixture(tmp_path, "sliding")
    expect_error(
        tmp_path, capsys, src, "sliding", ["train.csv, line 4", "history too long", "3 items", "max_history=2"],
        "--set", "max_history=2",
    )


TITLE_CASES = {
    "empty title": ('"6": ""', ["id2name4Rec.json, line 7", "empty title", "item 6"]),
    "missing title": ('"6": null', ["id2name4Rec.json, line 7", "missing title", "item 6"]),
    "blank title": ('"6": "   "', ["id2name4Rec.json, line 7", "empty title"]),
}


@pytest.mark.parametrize("case", sorted(TITLE_CASES))
def test_sliding_bad_title(tmp_path, capsys, case):
    new, fragments = TITLE_CASES[case]
    src = copy_fixture(tmp_path, "sliding")
    path = src / "id2name4Rec.json"
    path.write_text(path.read_text().replace('"6": "Sticky Notes"', new))
    expect_error(tmp_path, capsys, src, "sliding", fragments)


def test_sliding_title_not_utf8(tmp_path, capsys):
    src = copy_fixture(tmp_path, "sliding")
    path = src / "id2name4Rec.json"
    path.write_bytes(path.read_bytes().replace(b"Sticky Notes", b"Sticky \xff Notes"))
    expect_error(tmp_path, capsys, src, "sliding", ["id2name4Rec.json, line 7", "non-UTF-8 bytes", "item 6"])


def test_sliding_duplicate_item_id_with_other_title(tmp_path, capsys):
    src = copy_fixture(tmp_path, "sliding")
    path = src / "id2name4Rec.json"
    path.write_text(path.read_text().replace('"6": "Sticky Notes"', '"6": "Sticky Notes",\n    "2": "Red Stapler"'))
    expect_error(tmp_path, capsys, src, "sliding", ["id2name4Rec.json", "duplicate item id", "'Swingline Stapler'", "'Red Stapler'"])


def test_sliding_titles_not_json(tmp_path, capsys):
    src = copy_fixture(tmp_path, "sliding")
    path = src / "id2name4Rec.json"
    path.write_text(path.read_text().replace('"3": "Pens &amp; Paper Set",', '"3": "Pens &amp; Paper Set"'))
    expect_error(tmp_path, capsys, src, "sliding", ["id2name4Rec.json, line 5", "not valid JSON"])


@pytest.mark.parametrize("content", [b"", b"user_id,item_ids,timestamp\n"], ids=["zero bytes", "header only"])
def test_sliding_empty_file(tmp_path, capsys, content):
    src = copy_fixture(tmp_path, "sliding")
    (src / "test.csv").write_bytes(content)
    expect_error(tmp_path, capsys, src, "sliding", ["test.csv", "empty file"])


def test_sliding_missing_columns(tmp_path, capsys):
    src = copy_fixture(tmp_path, "sliding")
    replace_line(src / "valid.csv", 1, b"user,item_ids,timestamp")
    expect_error(tmp_path, capsys, src, "sliding", ["valid.csv, line 1", "missing column(s) user_id"])


def test_sliding_missing_titles_file(tmp_path, capsys):
    src = copy_fixture(tmp_path, "sliding")
    (src / "id2name4Rec.json").unlink()
    expect_error(tmp_path, capsys, src, "sliding", ["id2name4Rec.json not found"])


def test_existing_output_is_kept_on_error(tmp_path, capsys):
    """A failed run leaves an earlier good Dataset untouched."""
    src = copy_fixture(tmp_path, "sliding")
    code, out = curate(tmp_path, src, "sliding")
    assert code == 0
    before = (out / "manifest.json").read_bytes()
    replace_line(src / "train.csv", 2, b'1,"[1, 99]",100')
    code, out = curate(tmp_path, src, "sliding")
    assert code == 2
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["dataset"]


def test_sliding_drop_bad_rows_counts_them(tmp_path, capsys):
    """Drop mode: two bad train rows and one empty title are skipped and counted by reason.

    Item 6 loses its title, so test.csv's window [4, 5, 6] and train's [2, 6] refer to an unknown id.
    """
    src = copy_fixture(tmp_path, "sliding")
    replace_line(src / "train.csv", 2, b'1,"[1, 2, 3]"')
    path = src / "id2name4Rec.json"
    path.write_text(path.read_text().replace('"6": "Sticky Notes"', '"6": ""'))
    code, out = curate(tmp_path, src, "sliding", "--on-bad-rows", "drop")
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    bad = manifest["recipe"]["bad_rows"]
    assert bad["policy"] == "drop"
    assert bad["by_reason"] == {"empty title": 1, "malformed CSV": 1, "unknown item id": 2}
    assert bad["dropped"] == 4
    assert manifest["counts"] == {"items": 5, "train": 2, "valid": 1, "test": 0}
    assert "4 bad rows dropped" in capsys.readouterr().out


# ---- d3 ----------------------------------------------------------------------------------------


def test_d3_info_line_without_tab(tmp_path, capsys):
    src = copy_fixture(tmp_path, "d3")
    replace_line(src / "info" / "Tiny.txt", 3, b"Desk Lamp 2")
    expect_error(tmp_path, capsys, src, "d3", ["Tiny.txt, line 3", "expected title<TAB>item_id"])


def test_d3_duplicate_id_in_info(tmp_path, capsys):
    src = copy_fixture(tmp_path, "d3")
    with open(src / "info" / "Tiny.txt", "ab") as f:
        f.write(b"Another Stapler\t0\n")
    expect_error(tmp_path, capsys, src, "d3", ["Tiny.txt, line 5", "duplicate item id", "item id 0"])


def test_d3_unknown_target(tmp_path, capsys):
    src = copy_fixture(tmp_path, "d3")
    path = src / "valid" / "Tiny.csv"
    path.write_text(path.read_text().replace('"[2, 3]",0,', '"[2, 3]",7,'))
    expect_error(tmp_path, capsys, src, "d3", ["Tiny.csv, line 2", "unknown item id", "item id 7"])


# ---- amazon2014 / amazon2018 -------------------------------------------------------------------

REVIEW_CASES = {
    "truncated JSON": (b'{"reviewerID": "A1", "asin": "ITEM2", "unixRev', ["line 4", "malformed JSON"]),
    "missing asin": (b'{"reviewerID": "A1", "unixReviewTime": 200}', ["line 4", "missing field", "asin"]),
    "non-UTF-8": (b'{"reviewerID": "A1\xff", "asin": "ITEM2", "unixReviewTime": 200}', ["line 4", "non-UTF-8 bytes"]),
    "time not a number": (b'{"reviewerID": "A1", "asin": "ITEM2", "unixReviewTime": "soon"}', ["line 4", "unixReviewTime"]),
    "empty id": (b'{"reviewerID": "", "asin": "ITEM2", "unixReviewTime": 200}', ["line 4", "not a non-empty string"]),
    "not an object": (b'[1, 2, 3]', ["line 4", "malformed JSON"]),
}


@pytest.mark.parametrize("case", sorted(REVIEW_CASES))
def test_amazon_bad_review_line(tmp_path, capsys, case):
    line, fragments = REVIEW_CASES[case]
    src = copy_fixture(tmp_path, "amazon2014")
    replace_line(src / "reviews_Tiny_5.json", 4, line)
    expect_error(tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014", ["reviews_Tiny_5.json", *fragments], *RAW_SETTINGS)


def test_amazon_empty_reviews_file(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2014")
    (src / "reviews_Tiny_5.json").write_bytes(b"")
    expect_error(tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014", ["reviews_Tiny_5.json", "empty file"])


def test_amazon_empty_meta_file(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2014")
    (src / "meta_Tiny.json").write_bytes(b"")
    expect_error(tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014", ["meta_Tiny.json", "empty file"])


def test_amazon2014_meta_duplicate_asin_other_title(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2014")
    with open(src / "meta_Tiny.json", "a") as f:
        f.write("{'asin': 'ITEM1', 'title': 'Red Stapler'}\n")
    expect_error(
        tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014",
        ["meta_Tiny.json, line 8", "duplicate item id", "ITEM1"],
    )


def test_amazon2014_meta_malformed_line(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2014")
    replace_line(src / "meta_Tiny.json", 2, b"{'asn' 'ITEM2', 'title': 'Post-it'")
    expect_error(tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014", ["meta_Tiny.json, line 2", "malformed metadata"])


def test_amazon2014_meta_is_python_literal_not_json(tmp_path, capsys):
    """JSON metadata given as amazon2014 still reads (JSON objects with plain strings are Python literals)."""
    src = copy_fixture(tmp_path, "amazon2014")
    meta = [json.loads(line) for line in (FIXTURES / "amazon2018" / "meta_Tiny.json").read_text().splitlines()]
    (src / "meta_Tiny.json").write_text("".join(json.dumps(m) + "\n" for m in meta))
    code, _ = curate(tmp_path, src / "reviews_Tiny_5.json", "amazon2014", *RAW_SETTINGS)
    assert code == 0, capsys.readouterr().err


def test_amazon2018_meta_malformed_json(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2018")
    replace_line(src / "meta_Tiny.json", 3, b'{"asin": "ITEM2", "title": "Post-it')
    expect_error(tmp_path, capsys, src / "Tiny_5.json", "amazon2018", ["meta_Tiny.json, line 3", "malformed JSON"])


def test_amazon_missing_meta(tmp_path, capsys):
    src = copy_fixture(tmp_path, "amazon2014")
    (src / "meta_Tiny.json").unlink()
    expect_error(tmp_path, capsys, src / "reviews_Tiny_5.json", "amazon2014", ["cannot find the metadata file", "--meta"])


def test_amazon_drop_bad_lines_counts_them(tmp_path, capsys):
    """Drop mode: C1's first review (line 3, the untitled ITEM5) turned into garbage changes nothing else."""
    src = copy_fixture(tmp_path, "amazon2014")
    replace_line(src / "reviews_Tiny_5.json", 3, b"not json at all")
    code, out = curate(tmp_path, src / "reviews_Tiny_5.json", "amazon2014", "--on-bad-rows", "drop", *RAW_SETTINGS)
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["recipe"]["bad_rows"]["by_reason"] == {"malformed JSON": 1}
    assert manifest["recipe"]["bad_rows"]["examples"][0]["line"] == 3
    assert manifest["counts"] == {"items": 4, "train": 2, "valid": 1, "test": 1}


def test_unknown_domain(tmp_path, capsys):
    out = tmp_path / "out" / "dataset"
    code = main(["curate", "--source", str(FIXTURES / "sliding"), "--format", "sliding", "--domain", "furniture", "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "domain='furniture'" in err and "unknown domain" in err
    assert not out.exists()
