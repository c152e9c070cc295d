"""Text that is not acceptable in any string field of any reader: lone UTF-16 surrogates (from `\\uXXXX`
JSON escapes or Python-literal escapes) and control characters. Each is a bad row naming the file and line
(exit 2, nothing written), or a dropped and counted row under --on-bad-rows drop; never a traceback."""

from __future__ import annotations

import json

import pytest
from test_curate_errors import RAW_SETTINGS, copy_fixture, curate, expect_error, replace_line

from gdrt_core.text import CONTROL, NON_UTF8, SURROGATE, printable, text_problem


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("Gel Pen \ud83d", SURROGATE), ("\ude00 Pen", SURROGATE), ("x\udbff", SURROGATE),
        ("bytes \udcff", NON_UTF8), ("a\x00b", CONTROL), ("\x1b[31mred\x1b[0m", CONTROL), ("bell\x07", CONTROL),
        ("del\x7f", CONTROL), ("next line\x85", CONTROL), ("carriage\rreturn", CONTROL), ("form\x0cfeed", CONTROL),
    ],
)
def test_text_problem_refuses(text, reason):
    assert text_problem(text)[0] == reason


@pytest.mark.parametrize("text", ["Gel Pen \U0001f58a", "tab\tand\nnewline", "Ünïcödé ½ — “quotes”", "&amp;"])
def test_text_problem_accepts(text):
    assert text_problem(text) is None


def test_printable_escapes_what_a_terminal_would_obey():
    assert printable("\x1b[31mred\x1b[0m\n\t\x00\ud83d ok ü") == "\\x1b[31mred\\x1b[0m\\n\\t\\x00\\ud83d ok ü"


# JSON text of a title: \u escapes as they appear in the file
BAD_JSON_TITLES = {
    "high surrogate": ("Sticky \\ud83d", SURROGATE),
    "low surrogate": ("\\ude00 Sticky", SURROGATE),
    "NUL": ("Sticky\\u0000Notes", CONTROL),
    "ANSI escape": ("\\u001b[31mSticky\\u001b[0m", CONTROL),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_TITLES))
def test_sliding_title(tmp_path, capsys, case):
    title, reason = BAD_JSON_TITLES[case]
    src = copy_fixture(tmp_path, "sliding")
    path = src / "id2name4Rec.json"
    path.write_text(path.read_text().replace('"Sticky Notes"', f'"{title}"'))
    expect_error(tmp_path, capsys, src, "sliding", ["id2name4Rec.json, line 7", reason, "item 6"])
    code, out = curate(tmp_path, src, "sliding", "--on-bad-rows", "drop")
    assert code == 0, capsys.readouterr().err
    bad = json.loads((out / "manifest.json").read_text())["recipe"]["bad_rows"]
    assert bad["by_reason"][reason] == 1


@pytest.mark.parametrize(
    ("user", "reason"), [(b"1\x00", CONTROL), (b"\x1b[2J1", CONTROL), (b"1\x7f", CONTROL)],
    ids=["NUL", "ANSI", "DEL"],
)
@pytest.mark.parametrize("fmt", ["sliding", "d3"])
def test_user_id(tmp_path, capsys, fmt, user, reason):
    src = copy_fixture(tmp_path, fmt)
    if fmt == "sliding":
        path, line = src / "train.csv", user + b',"[1, 2, 3]",100'
    else:
        path = src / "train" / "Tiny.csv"
        line = path.read_bytes().split(b"\n")[1].replace(b"AU1", user, 1)
    replace_line(path, 2, line)
    expect_error(tmp_path, capsys, src, fmt, [f"{path.name}, line 2", reason, "column user_id"])


@pytest.mark.parametrize(("title", "reason"), [(b"Desk \x1b[31mLamp", CONTROL), (b"Desk\x00Lamp", CONTROL)])
def test_d3_title(tmp_path, capsys, title, reason):
    src = copy_fixture(tmp_path, "d3")
    replace_line(src / "info" / "Tiny.txt", 3, title + b"\t2")
    expect_error(tmp_path, capsys, src, "d3", ["Tiny.txt, line 3", reason, "item 2"])


META_2014 = {  # line 2 of meta_Tiny.json (ITEM2, reviewed): Python-literal escapes
    "high surrogate": ("{'asin': 'ITEM2', 'title': 'Post-it \\ud83d Notes'}", SURROGATE),
    "low surrogate in a double-quoted literal": ('{\'asin\': \'ITEM2\', \'title\': "Post-it\'s \\udc00"}', SURROGATE),
    "escape character": ("{'asin': 'ITEM2', 'title': '\\x1b[31mPost-it'}", CONTROL),
    "NUL": ("{'asin': 'ITEM2', 'title': 'Post\\x00it'}", CONTROL),
}


@pytest.mark.parametrize("case", sorted(META_2014))
def test_amazon2014_meta_title(tmp_path, capsys, case):
    line, reason = META_2014[case]
    src = copy_fixture(tmp_path, "amazon2014")
    replace_line(src / "meta_Tiny.json", 2, line.encode())
    reviews = src / "reviews_Tiny_5.json"
    expect_error(tmp_path, capsys, reviews, "amazon2014", ["meta_Tiny.json, line 2", reason, "ITEM2"], *RAW_SETTINGS)
    code, out = curate(tmp_path, reviews, "amazon2014", "--on-bad-rows", "drop", *RAW_SETTINGS)
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["recipe"]["bad_rows"]["by_reason"] == {reason: 1}


@pytest.mark.parametrize("case", sorted(BAD_JSON_TITLES))
def test_amazon2018_meta_title(tmp_path, capsys, case):
    title, reason = BAD_JSON_TITLES[case]
    src = copy_fixture(tmp_path, "amazon2018")
    replace_line(src / "meta_Tiny.json", 3, b'{"asin": "ITEM2", "title": "' + title.encode() + b'"}')
    expect_error(tmp_path, capsys, src / "Tiny_5.json", "amazon2018", ["meta_Tiny.json, line 3", reason, "ITEM2"])


REVIEWER_IDS = {
    "high surrogate": ("A1\\ud83d", SURROGATE),
    "NUL": ("A\\u00001", CONTROL),
    "ANSI escape": ("\\u001b[31mA1", CONTROL),
    "C1 control in the asin": (None, CONTROL),
}


@pytest.mark.parametrize("case", sorted(REVIEWER_IDS))
@pytest.mark.parametrize("fmt", ["amazon2014", "amazon2018"])
def test_amazon_review_ids(tmp_path, capsys, fmt, case):
    user, reason = REVIEWER_IDS[case]
    asin = "ITEM2\\u0085" if user is None else "ITEM2"
    src = copy_fixture(tmp_path, fmt)
    reviews = src / ("reviews_Tiny_5.json" if fmt == "amazon2014" else "Tiny_5.json")
    line = f'{{"reviewerID": "{user or "A1"}", "asin": "{asin}", "unixReviewTime": 200}}'
    replace_line(reviews, 4, line.encode())
    expect_error(tmp_path, capsys, reviews, fmt, [f"{reviews.name}, line 4", reason], *RAW_SETTINGS)
    code, out = curate(tmp_path, reviews, fmt, "--on-bad-rows", "drop", *RAW_SETTINGS)
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["recipe"]["bad_rows"]["by_reason"] == {reason: 1}


def test_the_vectorised_prefilter_matches_exactly_the_refused_control_characters():
    """The RE2 pattern the pyarrow fast paths use flags the same characters `text_problem` refuses."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gdrt_core.text import CONTROL_RE2

    chars = [chr(c) for c in range(0x3000) if not 0xD800 <= c <= 0xDFFF]
    flagged = pc.match_substring_regex(pa.array(chars), CONTROL_RE2).to_pylist()
    assert flagged == [text_problem(c) is not None for c in chars]
