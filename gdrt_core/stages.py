"""One entry point for every stage, used by the pipeline's components: settings dict in, scalars out.

`run_stage("evaluate", {"num_beams": 10}, dataset=..., model=..., out=...)` builds the stage's typed config
(unknown settings are an error naming them), runs it, and returns the small scalars a KFP artifact carries
in its metadata. The CLI builds the same configs from flags (gdrt_core.cli).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

from gdrt_core.config import load_config

STAGES: dict[str, tuple[str, str]] = {
    "curate": ("gdrt_core.curate", "CurateConfig"),
    "init-model": ("gdrt_core.embedded", "EmbeddedConfig"),
    "train": ("gdrt_core.train", "TrainConfig"),
    "group": ("gdrt_core.grouping", "GroupConfig"),
    "attribute": ("gdrt_core.attribution", "AttributeConfig"),
    "evaluate": ("gdrt_core.evaluate", "EvalConfig"),
}
# The pipeline's parameters and their defaults (pipelines/gdrt_pipeline.py takes its defaults from here;
# `gdrt sweep` fills what a config leaves out from here, without importing kfp).
PIPELINE_DEFAULTS: dict[str, Any] = {
    "source": "data/office",
    "source_format": "sliding",
    "domain": "office",
    "base_model": "",
    "experiment": "gdrt",
    "run_name": "gdrt-office",
    "tau": 1.0,
    "num_groups": 4,
    "prior": "uniform",
    "num_gpus": 1,
    "deepspeed": "zero2",
    "eval_split": "test",
    "curate_settings": {},
    "model_settings": {"size": "small"},
    "train_settings": {},
    "group_settings": {},
    "eval_settings": {},
    "valid_eval_settings": {"limit": 500},
    "attribute_settings": {},
}
PARENT_RUN_ENV = "GDRT_PARENT_RUN_ID"
RUN_NAME_ENV = "GDRT_RUN_NAME"  # the stage's MLflow run name, e.g. "evaluate sft"


def stage_config(stage: str, settings: dict | None = None, **values: Any):
    """The stage's config dataclass from `settings` (typed values; KFP passes whole numbers as floats, which
    int settings accept) and explicit `values` (None = keep the setting or default)."""
    module_name, cls_name = STAGES[stage]
    cls = getattr(importlib.import_module(module_name), cls_name)
    return load_config(cls, None, None, **{**(settings or {}), **{k: v for k, v in values.items() if v is not None}})


# pipeline parameter -> (stage, setting) that receives it
PARAMETER_SETTINGS: dict[str, tuple[str, str]] = {
    "source_format": ("curate", "format"), "domain": ("curate", "domain"), "tau": ("train", "tau"),
    "num_groups": ("group", "num_groups"), "prior": ("train", "prior"), "num_gpus": ("train", "num_gpus"),
    "eval_split": ("evaluate", "split"),
}


def check_pipeline_params(params: dict, source: str) -> None:
    """Check a whole pipeline config before its first stage: every parameter known and in its range, every
    stage's settings (curate, base model, both trainings, group, the evaluations, attribution) resolved into
    the stage's config exactly as the pipeline will pass them. Touches no file; `source` names the config."""
    from gdrt_core.config import check_setting, from_dict
    from gdrt_core.errors import GdrtError

    unknown = sorted(set(params) - set(PIPELINE_DEFAULTS))
    if unknown:
        raise GdrtError(f"unknown pipeline parameter(s) {', '.join(unknown)}", path=source,
                        hint=f"known: {', '.join(PIPELINE_DEFAULTS)}")
    p = {**PIPELINE_DEFAULTS, **params}
    for key, default in PIPELINE_DEFAULTS.items():  # KFP passes str parameters as strings only
        if isinstance(default, str) and p[key] is not None and not isinstance(p[key], str):
            raise GdrtError(f"pipeline parameter {key} must be a string, got {p[key]!r}", path=source,
                            hint=f"quote the value: {key}: \"VALUE\" in the config, --set {key}='\"VALUE\"' on the command line")
    for key, (stage, setting) in PARAMETER_SETTINGS.items():
        module_name, cls_name = STAGES[stage]
        cls = getattr(importlib.import_module(module_name), cls_name)
        p[key] = check_setting(cls, setting, p[key], key, source)
    for key in PIPELINE_DEFAULTS:
        if key.endswith("_settings") and not isinstance(p[key] or {}, dict):
            raise GdrtError(f"{key} must be a mapping of the stage's settings, got {p[key]!r}", path=source)
    deepspeed = p["deepspeed"] or None
    stages = [
        ("curate_settings", "curate", {"source": p["source"], "format": p["source_format"], "domain": p["domain"],
                                       "out": "<dataset>"}),
        ("train_settings", "train", {"dataset": "<dataset>", "model": "<base model>", "out": "<model>",
                                     "objective": "sft", "num_gpus": p["num_gpus"], "deepspeed": deepspeed}),
        ("train_settings", "train", {"dataset": "<dataset>", "model": "<base model>", "out": "<model>",
                                     "objective": "gdrt", "groups": "<groups>", "tau": p["tau"], "prior": p["prior"],
                                     "num_groups": p["num_groups"], "num_gpus": p["num_gpus"], "deepspeed": deepspeed}),
        ("group_settings", "group", {"dataset": "<dataset>", "reference": "<sft model>", "out": "<groups>",
                                     "num_groups": p["num_groups"]}),
        ("eval_settings", "evaluate", {"dataset": "<dataset>", "model": "<model>", "out": "<eval>",
                                       "split": p["eval_split"]}),
        ("valid_eval_settings", "evaluate", {"dataset": "<dataset>", "model": "<model>", "out": "<eval>",
                                             "split": "valid"}),
        ("attribute_settings", "attribute", {"dataset": "<dataset>", "model": "<model>", "out": "<attribution>",
                                             "split": p["eval_split"]}),
    ]
    try:
        init_settings = base_model_settings(str(p["base_model"] or ""), dict(p["model_settings"] or {}))
    except GdrtError as e:
        raise GdrtError(str(e), path=source) from None
    if init_settings is not None:  # the base model step runs init-model with these settings
        stages.append(("model_settings", "init-model", {"dataset": "<dataset>", "out": "<base model>"}))
    for section, stage, values in stages:
        module_name, cls_name = STAGES[stage]
        cls = getattr(importlib.import_module(module_name), cls_name)
        section_settings = init_settings if section == "model_settings" else p[section]
        settings = {k: v for k, v in dict(section_settings or {}).items() if k != "run_name"}
        try:
            from_dict(cls, {**settings, **values}, source=f"{section} (the {stage} stage)")
        except GdrtError as e:
            raise GdrtError(str(e), path=source) from None


def scalars(obj: Any, prefix: str = "", limit: int = 200) -> dict[str, Any]:
    """The numbers and short strings of a (nested) result, flattened: what fits in KFP metadata."""
    out: dict[str, Any] = {}
    if dataclasses.is_dataclass(obj):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(scalars(v, f"{prefix}{k}.", limit))
    elif isinstance(obj, bool) or (isinstance(obj, (int, float)) and obj == obj):
        out[prefix[:-1]] = obj
    elif isinstance(obj, str) and len(obj) <= limit:
        out[prefix[:-1]] = obj
    return out


def run_stage(stage: str, settings: dict | None = None, *, parent_run_id: str = "", **values: Any) -> dict:
    """Run one stage (nested under MLflow run `parent_run_id` when given); returns its scalar results."""
    if parent_run_id:
        os.environ[PARENT_RUN_ENV] = parent_run_id
    settings = dict(settings or {})
    run_name = settings.pop("run_name", None)
    if run_name:
        os.environ[RUN_NAME_ENV] = str(run_name)
    config = stage_config(stage, settings, **values)
    module = importlib.import_module(STAGES[stage][0])
    result = module.run(config)
    return scalars(result if isinstance(result, dict) else {})


REFERENCE_FILE = "base_model.json"
BASE_MODEL_FORMS = "'' or embedded[:tiny|small], pretrained:NAME, gguf:FILE, a model directory or a hub id"


def base_model_settings(base_model: str, settings: dict | None = None) -> dict | None:
    """The init-model settings that `base_model` asks for, or None when it names a directory / hub id.

    ''                     -> the embedded default model, `settings` as given (size, seed)
    embedded:tiny|small    -> the embedded model of that size
    pretrained:smollm2-135m -> a pretrained backbone from the package index (gdrt_core.pretrained)
    gguf:/path/model.gguf  -> a local GGUF file, converted
    """
    value = base_model.strip()
    settings = dict(settings or {})
    kind, sep, arg = value.partition(":")
    if not value or value == "embedded":
        return settings
    if sep and kind == "embedded":
        return {**settings, "size": arg}
    if sep and kind in ("pretrained", "gguf"):
        if not arg.strip():
            from gdrt_core.errors import GdrtError

            raise GdrtError(f"base_model {value!r} names no {kind} model", hint=f"use one of {BASE_MODEL_FORMS}")
        from gdrt_core.embedded import EMBEDDED_ONLY

        return {k: v for k, v in settings.items() if k not in EMBEDDED_ONLY} | {kind: arg.strip()}
    return None


def prepare_base_model(base_model: str, settings: dict | None = None, *, dataset: str, out: str) -> dict:
    """The training start point as a directory: the embedded default model built for `dataset`, a pretrained
    backbone / converted GGUF (`pretrained:NAME`, `gguf:FILE`), or (when `base_model` names a hub id or path)
    a small reference file pointing at it."""
    from gdrt_core.artifacts import atomic_output_dir, write_json_atomic

    init_settings = base_model_settings(base_model, settings)
    if init_settings is None:
        with atomic_output_dir(out) as tmp:
            write_json_atomic(tmp / REFERENCE_FILE, {"model": base_model.strip()})
        return {"base_model": base_model.strip()}
    result = run_stage("init-model", init_settings, dataset=dataset, out=out)
    return {"base_model": base_model.strip() or "embedded", **result}


def model_source(path: str) -> str:
    """A model directory, or the hub id / path recorded by `prepare_base_model`."""
    import json
    from pathlib import Path

    ref = Path(path) / REFERENCE_FILE
    if ref.is_file():
        return json.loads(ref.read_text(encoding="utf-8"))["model"]
    return path


def run_report(models: list[tuple[str, str, str | None]], *, out: str, title: str, parent_run_id: str = "") -> dict:
    """The report stage over (label, eval dir, attribution dir) triples; logged to the parent run."""
    from gdrt_core.report import ModelResult, run
    from gdrt_core.tracking import Tracker, open_run

    tracker = open_run(parent_run_id) if parent_run_id else Tracker()
    comparison = run([ModelResult(*m) for m in models], out, title=title, tracker=tracker)
    return scalars({"relative_change": comparison["relative_change"]})
