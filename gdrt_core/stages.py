"""The stage registry, and the one way a stage is run from outside its module.

`STAGES` names every stage: its module (which has `run(config, ...)`), its config dataclass and its help.
The `gdrt <stage>` commands (gdrt_core.cli), the pipeline's components (components/) and the runners
(pipelines/local_run.py, pipelines/sweep.py) all go through it:

- `run_stage("evaluate", {"num_beams": 10}, context=..., dataset=..., model=..., out=...)` builds the
  stage's typed config (unknown settings are an error naming them), runs it under the MLflow run context,
  and returns the small scalars a KFP artifact carries in its metadata;
- `run_step(stage, settings, context, **args)` runs one step of the pipeline graph (pipelines/graph.py)
  from its arguments as a component receives them: artifact paths and pipeline parameters. The argument
  rules live here once: a base model step (`init-model`) that is only a reference to a hub id or directory,
  a model input that is such a reference (`model_source`), the report and register steps, step argument
  names that differ from the config's (`STEP_ARGUMENTS`).

This module knows nothing of the pipeline's graph or parameters (pipelines/ does); gdrt_core never
imports pipelines/ or components/.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any

from gdrt_core.config import load_config

if TYPE_CHECKING:
    from gdrt_core.tracking import RunContext


@dataclasses.dataclass(frozen=True)
class Stage:
    module: str  # has run(config, ...) and the config class
    config: str  # the config dataclass's name
    help: str  # one line, for `gdrt --help`

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)


STAGES: dict[str, Stage] = {
    "curate": Stage("gdrt_core.curate", "CurateConfig",
                    "turn raw or preprocessed Amazon data into a Dataset artifact"),
    "init-model": Stage("gdrt_core.embedded", "EmbeddedConfig",
                        "the base model: the embedded default model (tokenizer + small Llama) built for a "
                        "dataset, or a pretrained backbone (--pretrained NAME, --gguf FILE)"),
    "train": Stage("gdrt_core.train", "TrainConfig", "fine-tune with SFT or GDRT"),
    "group": Stage("gdrt_core.grouping", "GroupConfig",
                   "group target tokens by their history-masked log-probability"),
    "attribute": Stage("gdrt_core.attribution", "AttributeConfig",
                       "feature-ablation attribution: auxiliary vs history tokens"),
    "evaluate": Stage("gdrt_core.evaluate", "EvalConfig", "constrained beam search and ranking / fairness metrics"),
}
# steps of the pipeline graph that are not stages with a config: report (gdrt_core.report), register
STEP_KINDS = (*STAGES, "report", "register")
# step argument -> config field, where a component's argument (fixed by the compiled pipeline) is named
# differently from the stage's config field
STEP_ARGUMENTS: dict[str, dict[str, str]] = {"curate": {"source_format": "format"}, "train": {"base": "model"}}
MODEL_INPUTS = ("model", "reference")  # config fields that may be given a base model reference directory


def stage_config(stage: str, settings: dict | None = None, **values: Any):
    """The stage's config dataclass from `settings` (typed values; KFP passes whole numbers as floats, which
    int settings accept) and explicit `values` (None = keep the setting or default)."""
    cls = STAGES[stage].config_class()
    return load_config(cls, None, None, **{**(settings or {}), **{k: v for k, v in values.items() if v is not None}})


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


def run_config(stage: str, config: Any, context: RunContext | None = None) -> Any:
    """Run a stage's resolved config under `context`; returns what the stage's `run` returns."""
    import inspect

    from gdrt_core.tracking import current_context, use_context

    context = context or current_context()
    run = importlib.import_module(STAGES[stage].module).run
    with use_context(context):  # for a stage whose run() does not take the context argument yet
        if "context" in inspect.signature(run).parameters:
            return run(config, context=context)
        return run(config)


def run_stage(stage: str, settings: dict | None = None, *, context: RunContext | None = None, **values: Any) -> dict:
    """Run one stage under `context` (its MLflow parent run, run name, tracking on/off); returns its scalars."""
    result = run_config(stage, stage_config(stage, settings, **values), context)
    return scalars(result if isinstance(result, dict) else {})


# ------------------------------------------------------------------------------------- pipeline steps


def step_values(stage: str, args: dict[str, Any]) -> dict[str, Any]:
    """A pipeline step's arguments as the stage's config values: renamed to the config's fields, an empty
    `deepspeed` as None (KFP has no None for a string parameter)."""
    renames = STEP_ARGUMENTS.get(stage, {})
    values = {renames.get(k, k): v for k, v in args.items()}
    if "deepspeed" in values:
        values["deepspeed"] = values["deepspeed"] or None
    return values


def step_config(stage: str, settings: dict | None, args: dict[str, Any]):
    """The typed config a pipeline step resolves to (None: the step runs no stage with a config, e.g. a base
    model that is a hub id): what every runner must agree on. Model inputs stay as given (a reference
    directory is read when the step runs)."""
    if stage == "init-model":
        init_settings = base_model_settings(args["base_model"], settings)
        if init_settings is None:
            return None
        return stage_config(stage, init_settings, dataset=args["dataset"], out=args["out"])
    if stage not in STAGES:
        return None
    return stage_config(stage, settings, **step_values(stage, args))


NOT_REGISTERED = "not registered: MLflow tracking is off (GDRT_TRACKING)"


def run_step(stage: str, settings: dict | None, context: RunContext | None = None, **args: Any) -> dict | str:
    """Run one step of the pipeline graph from its arguments (artifact paths, parameters, `out`) as the
    components and the local runners receive them; returns the scalars for the output's metadata (the
    register step: its decision text)."""
    from gdrt_core.tracking import RunContext

    context = context or RunContext()
    if stage == "init-model":
        return prepare_base_model(args["base_model"], settings, dataset=args["dataset"], out=args["out"],
                                  context=context)
    if stage == "report":
        return run_report([("SFT", args["sft_eval"], args["sft_attribution"]),
                           ("GDRT", args["gdrt_eval"], args["gdrt_attribution"])], out=args["out"],
                          title=args["title"], dataset=args.get("dataset"), context=context)
    if stage == "register":
        if not context.enabled:  # the registry is MLflow's: nothing is logged, and no store opened or created
            return NOT_REGISTERED
        from gdrt_core.registry import register_model

        return register_model(args["model"], args["dataset"], args["valid_eval"], domain=args["domain"],
                              parent_run_id=context.parent_run_id)
    values = step_values(stage, args)
    for name in MODEL_INPUTS:
        if values.get(name):
            values[name] = model_source(values[name])
    return run_stage(stage, settings, context=context, **values)


# ------------------------------------------------------------------------------------------ base model

REFERENCE_FILE = "base_model.json"
BASE_MODEL_FORMS = "'' or embedded[:tiny|small], pretrained:NAME, gguf:FILE, a model directory or a hub id"


def base_model_settings(base_model: str | None, settings: dict | None = None) -> dict | None:
    """The init-model settings that `base_model` asks for, or None when it names a directory / hub id.

    '' or None             -> the embedded default model, `settings` as given (size, seed)
    embedded:tiny|small    -> the embedded model of that size
    pretrained:smollm2-135m -> a pretrained backbone from the package index (gdrt_core.pretrained)
    gguf:/path/model.gguf  -> a local GGUF file, converted
    """
    value = (base_model or "").strip()
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


def prepare_base_model(base_model: str, settings: dict | None = None, *, dataset: str, out: str,
                       context: RunContext | None = None) -> dict:
    """The training start point as a directory: the embedded default model built for `dataset`, a pretrained
    backbone / converted GGUF (`pretrained:NAME`, `gguf:FILE`), or (when `base_model` names a hub id or path)
    a small reference file pointing at it."""
    from gdrt_core.artifacts import atomic_output_dir, write_json_atomic

    init_settings = base_model_settings(base_model, settings)
    if init_settings is None:
        with atomic_output_dir(out) as tmp:
            write_json_atomic(tmp / REFERENCE_FILE, {"model": base_model.strip()})
        return {"base_model": base_model.strip()}
    result = run_stage("init-model", init_settings, context=context, dataset=dataset, out=out)
    return {"base_model": base_model.strip() or "embedded", **result}


def model_source(path: str) -> str:
    """A model directory, or the hub id / path recorded by `prepare_base_model`."""
    import json
    from pathlib import Path

    ref = Path(path) / REFERENCE_FILE
    if ref.is_file():
        return json.loads(ref.read_text(encoding="utf-8"))["model"]
    return path


def run_report(models: list[tuple[str, str, str | None]], *, out: str, title: str, dataset: str | None = None,
               context: RunContext | None = None) -> dict:
    """The report stage over (label, eval dir, attribution dir) triples, the first the baseline; with the Dataset
    artifact they ranked, the paired comparisons with the baseline too; logged to the context's parent run."""
    from gdrt_core.report import ModelResult, run
    from gdrt_core.tracking import Tracker, open_run

    parent = context.parent_run_id if context else ""
    tracker = open_run(parent, enabled=context.enabled) if parent else Tracker()
    comparison = run([ModelResult(*m) for m in models], out, title=title, dataset=dataset, tracker=tracker)
    return scalars({"relative_change": comparison["relative_change"]})
