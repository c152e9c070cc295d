"""Each source format on small hand-made fixtures (tests/fixtures/curate), windows and splits checked by hand."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from gdrt_core.curate import CurateConfig, run
from gdrt_core.dataset import Dataset

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "curate"


def rows(ds: Dataset, split: str) -> list[tuple[str, list[int], int, int]]:
    t = ds.split(split).to_pydict()
    return list(zip(t["user_id"], t["history"], t["target"], t["timestamp"], strict=True))


def curate(tmp_path: Path, source: Path, fmt: str, **settings) -> tuple[Dataset, dict]:
    out = tmp_path / "ds"
    manifest = run(CurateConfig(source=str(source), format=fmt, domain="office", out=str(out), **settings))
    return Dataset(out), manifest


def test_sliding_reads_splits_as_published(tmp_path):
    """train.csv/valid.csv/test.csv as they are; titles keep `&amp;`; last id = target.

    Popularity = train interactions, each (user, position) once: user 1's windows [1,2,3]@100 and
    [1,2,3,4]@120 overlap in [1,2,3], so user 1 contributes 1,2,3,4; user 2 gives 4,5; user 3 gives 2,6.
    -> pop {1:1, 2:2, 3:1, 4:2, 5:1, 6:1}. Sorted by (pop, id): 1,3,5,6,2,4 cut into 5 groups of sizes
    2,1,1,1,1 -> groups {1:0, 3:0, 5:1, 6:2, 2:3, 4:4}.
    """
    ds, manifest = curate(tmp_path, FIXTURES / "sliding", "sliding")
    assert rows(ds, "train") == [("1", [1, 2], 3, 100), ("2", [4], 5, 110), ("1", [1, 2, 3], 4, 120), ("3", [2], 6, 130)]
    assert rows(ds, "valid") == [("1", [2, 3, 4], 5, 140)]
    assert rows(ds, "test") == [("2", [4, 5], 6, 150)]
    assert ds.split("test").column("example_id").to_pylist() == [5]
    assert ds.titles[3] == "Pens &amp; Paper Set"
    items = ds.items.to_pydict()
    assert dict(zip(items["item_id"], items["popularity"], strict=True)) == {1: 1, 2: 2, 3: 1, 4: 2, 5: 1, 6: 1}
    assert ds.pop_groups == {1: 0, 3: 0, 5: 1, 6: 2, 2: 3, 4: 4}
    assert manifest["domain"] == "office" and ds.domain == "office"
    assert manifest["recipe"]["files"] == {"train": "train.csv", "valid": "valid.csv", "test": "test.csv"}
    assert manifest["config"]["format"] == "sliding"


def test_sliding_sampled_train_and_carved_valid(tmp_path):
    """Only train_2.csv / train_4.csv: the larger is read. No valid: the latest train window by target
    time (ts 130, user 2) is carved as valid, size 1 = the test size; train keeps file order."""
    ds, manifest = curate(tmp_path, FIXTURES / "sliding_sampled", "sliding")
    assert manifest["recipe"]["files"]["train"] == "train_4.csv"
    assert rows(ds, "train") == [("1", [1, 2], 3, 100), ("1", [1, 2, 3], 4, 120), ("3", [2], 6, 110)]
    assert rows(ds, "valid") == [("2", [4], 5, 130)]
    assert rows(ds, "test") == [("2", [4, 5], 6, 150)]
    assert manifest["recipe"]["splits"]["valid"]["source"].startswith("carved")


def test_sliding_carve_size_and_max_train(tmp_path):
    """carve_size=2 takes ts 130 and 120 (time order); max_train=1 keeps RandomState(42).choice(2, 1)."""
    import numpy as np

    ds, manifest = curate(tmp_path, FIXTURES / "sliding_sampled", "sliding", carve_size=2, max_train=1)
    assert rows(ds, "valid") == [("1", [1, 2, 3], 4, 120), ("2", [4], 5, 130)]
    remaining = [("1", [1, 2], 3, 100), ("3", [2], 6, 110)]
    pick = int(np.random.RandomState(42).choice(2, size=1, replace=False)[0])
    assert rows(ds, "train") == [remaining[pick]]
    assert manifest["recipe"]["splits"]["train"]["sampled"]["rows"] == 1


def popularity(ds: Dataset) -> dict[int, int]:
    items = ds.items.to_pydict()
    return dict(zip(items["item_id"], items["popularity"], strict=True))


@pytest.mark.parametrize("fmt", ["sliding", "amazon2014"])
def test_popularity_counts_the_whole_train_split_before_sampling(tmp_path, fmt):
    """max_train=1 keeps one window; popularity still counts every training window unless popularity_from=sample.

    sliding (carve_size=2): train before sampling = user 1 [1,2]->3 and user 3 [2]->6 -> {1:1, 2:2, 3:1, 6:1};
    the sample alone counts 1,2,3 or 2,6. amazon2014 (tiny dump, see check_tiny_raw): train = B1 [2,3]->4 and
    A1 [1,2,3]->4 -> {1:1, 2:2, 3:2, 4:2}; the sample alone counts 2,3,4 or 1,2,3,4.
    """
    import numpy as np

    pick = int(np.random.RandomState(42).choice(2, size=1, replace=False)[0])
    if fmt == "sliding":
        source, settings = FIXTURES / "sliding_sampled", {"carve_size": 2}
        whole = {1: 1, 2: 2, 3: 1, 4: 0, 5: 0, 6: 1}
        sampled = [{1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0}, {1: 0, 2: 1, 3: 0, 4: 0, 5: 0, 6: 1}][pick]
    else:
        source, settings = FIXTURES / "amazon2014" / "reviews_Tiny_5.json", RAW_SETTINGS
        whole = {1: 1, 2: 2, 3: 2, 4: 2}
        sampled = [{1: 0, 2: 1, 3: 1, 4: 1}, {1: 1, 2: 1, 3: 1, 4: 1}][pick]
    ds, manifest = curate(tmp_path / "train", source, fmt, max_train=1, **settings)
    assert len(ds.split("train")) == 1
    assert popularity(ds) == whole
    assert "before sampling" in manifest["recipe"]["popularity"]
    only, manifest = curate(tmp_path / "sample", source, fmt, max_train=1, popularity_from="sample", **settings)
    assert rows(only, "train") == rows(ds, "train")
    assert popularity(only) == sampled
    assert "before sampling" not in manifest["recipe"]["popularity"]


def test_d3_reads_info_and_splits(tmp_path):
    """history_item_id / item_id / timestamp with ids from info/Tiny.txt (0-based, kept)."""
    ds, manifest = curate(tmp_path, FIXTURES / "d3", "d3")
    assert ds.titles == {0: "Stapler", 1: "Pens &amp; Paper", 2: "Desk Lamp", 3: "Paper Clips"}
    assert rows(ds, "train") == [("AU1", [0], 1, 200), ("AU2", [2], 3, 210), ("AU1", [0, 1], 2, 220)]
    assert rows(ds, "valid") == [("AU2", [2, 3], 0, 230)]
    assert rows(ds, "test") == [("AU1", [0, 1, 2], 3, 240)]
    assert manifest["recipe"]["name"] == "Tiny"


def test_d3_without_train_is_eval_only(tmp_path):
    """The shared D3 copies lack train: an empty train, popularity from valid+test, said in the manifest.

    valid: AU2 [2,3]->0; test: AU1 [0,1,2]->3 -> pop {0:2, 1:1, 2:2, 3:2}.
    """
    src = tmp_path / "d3"
    shutil.copytree(FIXTURES / "d3", src)
    shutil.rmtree(src / "train")
    ds, manifest = curate(tmp_path, src, "d3")
    assert ds.split("train").num_rows == 0
    assert "eval-only" in manifest["recipe"]["splits"]["train"]["source"]
    items = ds.items.to_pydict()
    assert dict(zip(items["item_id"], items["popularity"], strict=True)) == {0: 2, 1: 1, 2: 2, 3: 2}


RAW_SETTINGS = {"k_core": 2, "max_history": 3, "valid_fraction": 0.25, "test_fraction": 0.25}


def check_tiny_raw(ds: Dataset, manifest: dict) -> None:
    """The tiny raw dump, by hand (k=2, history <= 3, split 0.5/0.25/0.25).

    ITEM5 has no title and ITEM9's title 'X' is too short: C1's ITEM5 review goes, then C1 (1 review)
    and D1 (1 review) fail the 2-core. Left, in file order: A1 ITEM1, B1 ITEM2, A1 ITEM2, B1 ITEM3,
    A1 ITEM3, B1 ITEM4, A1 ITEM4, A1 ITEM1, A1 ITEM2 -> ids ITEM1=1, ITEM2=2, ITEM3=3, ITEM4=4.
    A1 = 1,2,3,4,1,2 at 100..600; B1 = 2,3,4 at 150,250,350. Windows (bigrec): A1 targets i >= 3 ->
    [1,2,3]->4@400, [2,3,4]->1@500, [3,4,1]->2@600; B1 targets i >= min(3, 2) = 2 -> [2,3]->4@350.
    By target time: 350, 400 | 500 | 600 -> train int(4*0.5)=2, valid up to int(4*0.75)=3, test 1.
    Train covers B1 positions 0-2 and A1 positions 0-3 -> popularity {1:1, 2:2, 3:2, 4:2}.
    """
    assert ds.titles == {1: "Swingline Stapler", 2: "Post-it Notes, 3'' x 3''", 3: "Desk Lamp", 4: "Pens & Pencils"}
    assert rows(ds, "train") == [("B1", [2, 3], 4, 350), ("A1", [1, 2, 3], 4, 400)]
    assert rows(ds, "valid") == [("A1", [2, 3, 4], 1, 500)]
    assert rows(ds, "test") == [("A1", [3, 4, 1], 2, 600)]
    items = ds.items.to_pydict()
    assert dict(zip(items["item_id"], items["popularity"], strict=True)) == {1: 1, 2: 2, 3: 2, 4: 2}
    stats = manifest["recipe"]["stats"]
    assert stats["reviews"] == 12 and stats["items_in_reviews"] == 6 and stats["items_with_title"] == 4
    assert stats["reviews_after_kcore"] == 9 and stats["users"] == 2 and stats["windows"] == 4


def test_amazon2014_recipe_by_hand(tmp_path):
    ds, manifest = curate(tmp_path, FIXTURES / "amazon2014" / "reviews_Tiny_5.json", "amazon2014", **RAW_SETTINGS)
    check_tiny_raw(ds, manifest)
    assert manifest["recipe"]["meta_file"] == "meta_Tiny.json"


def test_amazon2018_recipe_by_hand_gzipped(tmp_path):
    """2018: JSON metadata (with an exact duplicate line, as the real dumps have); .gz input."""
    src = tmp_path / "raw"
    src.mkdir()
    for name in ("Tiny_5.json", "meta_Tiny.json"):
        with open(FIXTURES / "amazon2018" / name, "rb") as f, gzip.open(src / f"{name}.gz", "wb") as g:
            g.write(f.read())
    ds, manifest = curate(tmp_path, src / "Tiny_5.json.gz", "amazon2018", **RAW_SETTINGS)
    check_tiny_raw(ds, manifest)
    assert manifest["recipe"]["meta_file"] == "meta_Tiny.json.gz"


def test_amazon_small_blocks_and_one_thread_agree(tmp_path):
    """Block boundaries and thread count do not change the result (blocks of 1 MiB vs one thread)."""
    src = FIXTURES / "amazon2014" / "reviews_Tiny_5.json"
    a, _ = curate(tmp_path / "a", src, "amazon2014", **RAW_SETTINGS, threads=1)
    b, _ = curate(tmp_path / "b", src, "amazon2014", **RAW_SETTINGS, threads=3, block_mb=1)
    for split in ("train", "valid", "test"):
        assert rows(a, split) == rows(b, split)


def test_line_blocks_cut_at_line_ends(tmp_path):
    from gdrt_core.curate.amazon import line_blocks

    path = tmp_path / "lines.json"
    text = b"".join(b'{"k": %d}\n' % i for i in range(1000)) + b'{"k": "last, no newline"}'
    path.write_bytes(text)
    blocks = list(line_blocks(path, 100))
    assert all(b.endswith(b"\n") for b in blocks)
    assert b"".join(blocks) == text + b"\n"


@pytest.mark.parametrize("fmt", ["amazon2014"])
def test_amazon_default_settings_on_fixture_keep_nothing(tmp_path, fmt):
    """With the default 5-core nothing in the tiny dump survives: a clear error, no output."""
    from gdrt_core.errors import GdrtError

    with pytest.raises(GdrtError, match="no interactions left"):
        curate(tmp_path, FIXTURES / fmt / "reviews_Tiny_5.json", fmt)
    assert not (tmp_path / "ds").exists()


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(st.binary(min_size=0, max_size=12).map(lambda b: b.replace(b"\n", b"x")), max_size=30),
    trailing_newline=st.booleans(), block=st.integers(1, 40), slack=st.integers(1, 8),
)
def test_read_line_range_gives_every_line_once(tmp_path_factory, lines, trailing_newline, block, slack):
    """Consecutive byte ranges, read independently, give the file's lines exactly once and in order."""
    import os

    from gdrt_core.curate.amazon import read_line_range

    text = b"\n".join(lines) + (b"\n" if trailing_newline and lines else b"")
    path = tmp_path_factory.mktemp("ranges") / "f.txt"
    path.write_bytes(text)
    fd = os.open(path, os.O_RDONLY)
    buffer = bytearray(block + slack + 1)  # reused for every range, as a parser thread does
    try:
        parts = [bytes(read_line_range(fd, s, s + block, len(text), slack)) for s in range(0, len(text), block)]
        buffered = [bytes(read_line_range(fd, s, s + block, len(text), slack, buffer=buffer))
                    for s in range(0, len(text), block)]
    finally:
        os.close(fd)
    assert all(p.endswith(b"\n") for p in parts if p)
    expected = text if text.endswith(b"\n") or not text else text + b"\n"
    assert b"".join(parts) == expected
    assert buffered == parts


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text(max_size=6) | st.binary(max_size=6).map(lambda b: b.decode("utf-8", "replace")),
                       max_size=8), raw=st.lists(st.binary(max_size=4), max_size=2))
def test_clean_ids_agrees_with_the_text_rule(values, raw):
    """The block check of the review ids (numpy on the bytes, then pyarrow and RE2) passes a block exactly
    when every id is non-empty valid UTF-8 that `text_problem` accepts (surrogates cannot be encoded)."""
    import pyarrow as pa

    from gdrt_core.curate.amazon import _clean_ids
    from gdrt_core.text import text_problem

    data = [v.encode("utf-8", "surrogatepass") for v in values] + raw
    expected = all(_acceptable(b, text_problem) for b in data)
    array = pa.array(data, pa.binary()).cast(pa.string(), safe=False)
    assert _clean_ids(array) == expected
    assert _clean_ids(array.slice(1)) == all(_acceptable(b, text_problem) for b in data[1:])


def _acceptable(value: bytes, text_problem) -> bool:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and text_problem(text) is None


def test_count_lines_reuses_its_scratch_array():
    from gdrt_core.curate.amazon import count_lines

    assert [count_lines(b) for b in (b"a\nb\n" * 1000, b"", b"\n", b"x" * 10 + b"\n\n")] == [2000, 0, 1, 2]


def test_meta_2014_literals():
    """Python-literal metadata: double-quoted titles, escaped quotes, title before asin, no title,
    unwanted asins skipped, a line only `ast.literal_eval` reads (extra spaces), a bad line reported."""
    import pyarrow as pa

    from gdrt_core.curate.amazon import parse_meta_2014_block

    entries = [
        repr({"asin": "A1", "title": "Don't Panic"}),
        repr({"asin": "A2", "title": "He said \"hi\", don't"}),
        repr({"title": "Title First", "price": 1.0, "asin": "A3"}),
        repr({"asin": "A4", "categories": [["Office"]]}),
        repr({"asin": "NOT_WANTED", "title": "x"}),
        "{ 'asin' :  'A5', 'title' : 'Spaced'}",
        "{'asin': 'A6', 'title': 'broken",
        "",
    ]
    block = ("\n".join(entries) + "\n").encode()
    wanted = pa.array(["A1", "A2", "A3", "A4", "A5", "A6"])
    lines, rows, bad = parse_meta_2014_block(block, wanted)
    assert lines == 8
    assert rows == [
        (1, "A1", "Don't Panic"), (2, "A2", "He said \"hi\", don't"), (3, "A3", "Title First"), (4, "A4", None),
        (6, "A5", "Spaced"),
    ]
    assert [(reason, line) for reason, _, line in bad] == [("malformed metadata", 7)]


def test_meta_2014_non_utf8_line(tmp_path, capsys):
    from gdrt_core.cli import main

    src = tmp_path / "raw"
    shutil.copytree(FIXTURES / "amazon2014", src)
    meta = src / "meta_Tiny.json"
    meta.write_bytes(meta.read_bytes().replace(b"Swingline", b"Swing\xffline"))
    out = tmp_path / "out"
    code = main(["curate", "--source", str(src / "reviews_Tiny_5.json"), "--format", "amazon2014", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "meta_Tiny.json, line 1" in err and "non-UTF-8 bytes" in err
    assert not out.exists()


@settings(max_examples=100, deadline=None)
@given(
    blocks=st.lists(st.lists(st.sampled_from(["a", "b", "c", "d", "e", "f"]), max_size=6), min_size=1, max_size=9),
    min_merge=st.integers(1, 8),
)
def test_id_coder_merges_blocks_in_first_appearance_order(blocks, min_merge):
    """Codes equal one dictionary encoding of all values together, whenever the blocks are merged."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gdrt_core.curate.amazon import IdCoder

    coder = IdCoder(min_merge=min_merge)
    for block in blocks:
        coder.add(pc.dictionary_encode(pa.array(block, pa.string())))
    codes, dictionary = coder.finish()
    values = [v for block in blocks for v in block]
    expected = pc.dictionary_encode(pa.array(values, pa.string()))
    assert codes.tolist() == expected.indices.to_pylist()
    assert (dictionary.to_pylist() if dictionary is not None else []) == expected.dictionary.to_pylist()


def test_clean_titles_rule():
    """Reference rule: missing or 1-char titles are none; ' VHS' / ' [VHS]' suffix and spaces stripped;
    then HTML entities unescaped (a title that is only spaces after that is none)."""
    from gdrt_core.curate import CurateConfig
    from gdrt_core.curate.amazon import clean_titles

    config = CurateConfig(source="", format="amazon2014", out="")
    raw = [None, "A", "Casablanca VHS", "Casablanca [VHS]", "  Pens &amp; Ink  ", "VHS", "  ", 42, "Q&amp;A"]
    assert clean_titles(raw, config) == [None, None, "Casablanca", "Casablanca", "Pens & Ink", "VHS", None, None, "Q&A"]
    config.unescape_titles = False
    assert clean_titles(["Pens &amp; Ink"], config) == ["Pens &amp; Ink"]


def test_config_from_yaml_and_overrides_lands_in_manifest(tmp_path, capsys):
    """YAML settings < --set overrides < flags; the resolved config is stored in the manifest."""
    import json

    from gdrt_core.cli import main

    config = tmp_path / "curate.yaml"
    config.write_text("k_core: 2\nmax_history: 3\nvalid_fraction: 0.3\ntest_fraction: 0.25\ndomain: toys\n")
    out = tmp_path / "ds"
    code = main([
        "curate", "--source", str(FIXTURES / "amazon2014" / "reviews_Tiny_5.json"), "--format", "amazon2014",
        "--out", str(out), "--config", str(config), "--set", "valid_fraction=0.25", "--domain", "office",
    ])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["k_core"] == 2 and manifest["config"]["valid_fraction"] == 0.25
    assert manifest["domain"] == "office" and manifest["config"]["domain"] == "office"
    check_tiny_raw(Dataset(out), manifest)


def test_sliding_with_bom_and_crlf(tmp_path):
    """Files saved by spreadsheet tools: a UTF-8 byte order mark and CRLF line ends read the same."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "sliding", src)
    for name in ("train.csv", "valid.csv", "test.csv", "id2name4Rec.json"):
        path = src / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    ds, _ = curate(tmp_path, src, "sliding")
    assert rows(ds, "train") == [("1", [1, 2], 3, 100), ("2", [4], 5, 110), ("1", [1, 2, 3], 4, 120), ("3", [2], 6, 130)]
    assert ds.titles[3] == "Pens &amp; Paper Set"
