"""The pipeline's base_model parameter: which init-model settings each form asks for (stages.base_model_settings)."""

from __future__ import annotations

import json

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.stages import REFERENCE_FILE, base_model_settings, model_source, prepare_base_model


@pytest.mark.parametrize(
    ("base_model", "settings", "expected"),
    [
        ("", {"size": "small", "seed": 0}, {"size": "small", "seed": 0}),
        ("  ", {}, {}),
        ("embedded", {"size": "tiny"}, {"size": "tiny"}),
        ("embedded:tiny", {"size": "small", "seed": 3}, {"size": "tiny", "seed": 3}),
        ("pretrained:smollm2-135m", {"size": "small", "seed": 0}, {"pretrained": "smollm2-135m"}),
        ("gguf:/models/qwen2.gguf", {"size": "small"}, {"gguf": "/models/qwen2.gguf"}),
        ("Qwen/Qwen2-0.5B", {"size": "small"}, None),
        ("/abs/model/dir", {}, None),
        ("./relative/dir", {}, None),
    ],
)
def test_base_model_forms(base_model, settings, expected):
    assert base_model_settings(base_model, settings) == expected


@pytest.mark.parametrize("value", ["pretrained:", "gguf:  "])
def test_a_form_without_a_name_is_refused(value):
    with pytest.raises(GdrtError, match="names no"):
        base_model_settings(value)


def test_hub_id_is_a_reference_and_unknown_pretrained_fails_before_writing(tmp_path):
    out = tmp_path / "ref"
    assert prepare_base_model("org/model", {}, dataset=str(tmp_path), out=str(out)) == {"base_model": "org/model"}
    assert json.loads((out / REFERENCE_FILE).read_text()) == {"model": "org/model"}
    assert model_source(str(out)) == "org/model"
    with pytest.raises(GdrtError, match="pretrained='nope' is invalid: must be one of smollm2-135m, gemma3-270m"):
        prepare_base_model("pretrained:nope", {}, dataset=str(tmp_path), out=str(tmp_path / "bad"))
    assert not (tmp_path / "bad").exists()
