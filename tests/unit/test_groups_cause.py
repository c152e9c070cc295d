"""Groups that do not fit the training tokens blame the right cause: another Dataset (the Dataset manifest
sha256 recorded in the Groups artifact differs from this dataset's, e.g. another curation of the same
source) before another tokenizer."""

from __future__ import annotations

import pytest

from gdrt_core.artifacts import atomic_output_dir, manifest_hash, write_manifest
from gdrt_core.dataset import Dataset
from gdrt_core.errors import GdrtError
from gdrt_core.train.data import build_features, groups_dataset_sha256


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from gdrt_core.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


def _lookup(dataset, tokenizer, shift: int = 0):
    """{(example_id, position): (token_id + shift, group 0)} for the first two train examples."""
    feats = build_features(dataset, "train", tokenizer, limit=2)
    return {
        (f["example_id"], k): (t + shift, 0)
        for f in feats for k, t in enumerate(t for t in f["labels"] if t != -100)
    }


@pytest.mark.parametrize(
    ("groups_on", "shift", "drop_keys", "expected"),
    [
        ("other", 1, False, "built on another Dataset"),
        ("other", 0, True, "built on another Dataset"),
        ("same", 1, False, "another tokenizer"),
        ("unknown", 1, False, "another tokenizer"),
        ("same", 0, True, "rebuild the Groups artifact from this dataset"),
    ],
)
def test_mismatch_names_the_cause(office_slice, office_dataset, tokenizer, groups_on, shift, drop_keys, expected):
    ds = Dataset(office_slice)
    lookup = _lookup(ds, tokenizer, shift)
    if drop_keys:
        lookup = {k: v for k, v in lookup.items() if k[1] > 0}
    recorded = {"other": manifest_hash(office_dataset), "same": manifest_hash(office_slice), "unknown": None}[groups_on]
    with pytest.raises(GdrtError, match=expected) as err:
        build_features(ds, "train", tokenizer, token_groups=lookup, limit=2, groups_path="g", groups_dataset=recorded)
    if groups_on == "other":
        assert "gdrt group --dataset" in str(err.value) and "tokenizer" not in str(err.value)


def test_matching_groups_pass(office_slice, tokenizer):
    ds = Dataset(office_slice)
    feats = build_features(ds, "train", tokenizer, token_groups=_lookup(ds, tokenizer), limit=2,
                           groups_dataset=manifest_hash(office_slice))
    assert len(feats) == 2


def test_the_groups_manifest_records_its_dataset(tmp_path, office_dataset):
    with atomic_output_dir(tmp_path / "g") as tmp:
        write_manifest(tmp, "groups", inputs={"dataset": office_dataset})
    assert groups_dataset_sha256(tmp_path / "g") == manifest_hash(office_dataset)
    with atomic_output_dir(tmp_path / "h") as tmp:
        write_manifest(tmp, "groups")
    assert groups_dataset_sha256(tmp_path / "h") is None
