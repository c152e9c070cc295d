"""The pipeline's parameters: their defaults, the config file they come from, and the check of a whole
config before its first step (every step of the graph resolved into its stage's config, touching no file).

The KFP pipeline functions take their defaults from `PIPELINE_DEFAULTS`; `gdrt run` and `gdrt sweep` fill
what a config leaves out from it. No kfp, no torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gdrt_core.errors import GdrtError

# `gdrt run` without --config: the quickstart beside this module, wherever the command is started (relative
# paths inside a config, such as its `source`, are relative to the current directory)
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "quickstart.yaml"
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
    "model_settings": {},  # the embedded model's settings (EmbeddedConfig's defaults: size small, seed 0)
    "train_settings": {},
    "group_settings": {},
    "eval_settings": {},
    "valid_eval_settings": {"limit": 500},
    "attribute_settings": {},
}
# text parameters that name something (the MLflow experiment, the run): never empty
NAME_PARAMETERS = ("experiment", "run_name")
# text parameters whose empty value means something (base_model: the embedded default; deepspeed: off): YAML's
# null (`base_model:` with nothing after it) is read as ""
EMPTY_MEANS_DEFAULT = ("base_model", "deepspeed")
# pipeline parameter -> (stage, setting) that receives it: its range is that setting's
PARAMETER_SETTINGS: dict[str, tuple[str, str]] = {
    "source_format": ("curate", "format"), "domain": ("curate", "domain"), "tau": ("train", "tau"),
    "num_groups": ("group", "num_groups"), "prior": ("train", "prior"), "num_gpus": ("train", "num_gpus"),
    "eval_split": ("evaluate", "split"),
}


def parameter_type(key: str) -> Any:
    """The type of a pipeline parameter or of one stage setting in it (`train_settings.out`): the type of
    its default, or of the setting in the config class of the stage that receives it; Any when unknown."""
    import typing

    top, _, rest = key.partition(".")
    if not rest:
        default = PIPELINE_DEFAULTS.get(top)
        return Any if default is None else type(default)
    classes = settings_classes()
    if top not in classes:
        return Any
    return typing.get_type_hints(classes[top]).get(rest, Any)


def settings_classes() -> dict[str, type]:
    """Each *_settings pipeline parameter -> the config class of the stage whose steps receive it."""
    from gdrt_core.stages import STAGES
    from pipelines import graph

    return {s.settings: STAGES[s.stage].config_class() for s in graph.steps() if s.settings and s.stage in STAGES}


def typed_parameters(params: dict, source: str) -> dict:
    """The pipeline parameters with the defaults filled in, and each one that a stage receives as a setting
    (`PARAMETER_SETTINGS`) read as that setting's type and checked against its range (`tau: 1` is 1.0)."""
    from gdrt_core.config import check_setting
    from gdrt_core.stages import STAGES

    p = {**PIPELINE_DEFAULTS, **params}
    for key, (stage, setting) in PARAMETER_SETTINGS.items():
        p[key] = check_setting(STAGES[stage].config_class(), setting, p[key], key, source)
    for key in NAME_PARAMETERS:
        if p[key] is None or not str(p[key]).strip():
            raise GdrtError(f"pipeline parameter {key} is empty", path=source,
                            hint=f"give it a name (the default is {PIPELINE_DEFAULTS[key]!r}), or leave the line out")
    for key in EMPTY_MEANS_DEFAULT:  # `base_model:` / `--set deepspeed=` (YAML null) mean what "" means
        if p[key] is None:
            p[key] = ""
    return p


def resolved_params(params: dict, source: str = "<config>") -> dict:
    """A pipeline config as the values it resolves to (`typed_parameters`), each *_settings mapping as
    `config.resolved_settings` of its stage (typed, the stage's defaults left out). Two configs that run the
    same stages resolve alike, however their numbers are written (`tau: 1` / `1.0`, `lr: 1e-3` / `0.001`)
    and whether a default is written out: the stage keys of `gdrt run` / `gdrt sweep` (`sweep.plan_steps`)
    and `gdrt run`'s resume check (`local_run.check_same_config`) compare this. A value that cannot be read
    is a GdrtError naming it and `source`."""
    from gdrt_core.config import resolved_settings

    p = typed_parameters(params, source)
    for key, cls in settings_classes().items():
        if isinstance(p.get(key) or {}, dict):
            p[key] = resolved_settings(cls, p.get(key) or {}, f"{source}: {key}")
    return p


def override(item: str) -> tuple[str, Any]:
    """A `--set key=value` of `gdrt run` / `gdrt sweep` as (key, value), read as the stage settings' --set
    values are (`config.set_value`): text as typed for a text parameter or setting, YAML otherwise."""
    from gdrt_core.config import parse_override, set_value

    key, value = parse_override(item)
    return key, set_value(value, parameter_type(key), key, f"--set {item}")


def load_params(config: str | os.PathLike | None, overrides: list[str]) -> dict:
    """Pipeline parameters from the YAML file (default: `DEFAULT_CONFIG`, which must exist: the built-in
    defaults alone would be a different run), then `key=value` overrides (`override`)."""
    from gdrt_core.config import read_yaml, set_dotted

    params = read_yaml(Path(config) if config else DEFAULT_CONFIG, "pipeline config")
    for item in overrides:
        set_dotted(params, *override(item), where=f"--set {item}")
    return params


def config_source(config: str | os.PathLike | None, overrides: list[str]) -> str:
    """How a pipeline config is named in error messages: its file, and the --set overrides if any."""
    path = str(config) if config else str(DEFAULT_CONFIG)
    return path + (f" with --set {' --set '.join(overrides)}" if overrides else "")


def check_pipeline_params(params: dict, source: str) -> None:
    """Check a whole pipeline config before its first step: every parameter known and in its range, and every
    step of the graph (curate, base model, both trainings, group, the evaluations, attribution) resolved into
    its stage's config exactly as the runners will pass it. Touches no file; `source` names the config."""
    from gdrt_core.config import from_dict
    from gdrt_core.stages import STAGES, base_model_settings, step_values
    from pipelines import graph

    check_parameter_names(params, source)
    unknown = sorted(set(params) - set(PIPELINE_DEFAULTS))
    if unknown:
        raise GdrtError(f"unknown pipeline parameter(s) {', '.join(unknown)}", path=source,
                        hint=f"known: {', '.join(PIPELINE_DEFAULTS)}")
    p = {**PIPELINE_DEFAULTS, **params}
    for key, default in PIPELINE_DEFAULTS.items():  # KFP passes str parameters as strings only
        if isinstance(default, str) and p[key] is not None and not isinstance(p[key], str):
            raise GdrtError(f"pipeline parameter {key} must be a string, got {p[key]!r}", path=source,
                            hint=f"quote the value in the config: {key}: \"VALUE\"")
    p = typed_parameters(p, source)
    for key in PIPELINE_DEFAULTS:
        if key.endswith("_settings") and not isinstance(p[key] or {}, dict):
            raise GdrtError(f"{key} must be a mapping of the stage's settings, got {p[key]!r}", path=source)
    check_wiring(p, source)
    for s in graph.steps():
        if s.stage not in STAGES:
            continue
        args = {**graph.step_args(s, p), **{arg: f"<{src}>" for arg, src in s.inputs.items()}, "out": f"<{s.name}>"}
        settings = {k: v for k, v in graph.step_settings(s, p).items() if k != "run_name"}
        values = step_values(s.stage, args)
        if s.stage == "init-model":
            try:
                settings = base_model_settings(str(p["base_model"] or ""), settings)
            except GdrtError as e:
                raise GdrtError(str(e), path=source) from None
            if settings is None:  # a directory or hub id: no init-model stage runs
                continue
            values.pop("base_model")
        try:
            from_dict(STAGES[s.stage].config_class(), {**settings, **values},
                      source=f"{s.settings} (the {s.stage} stage)")
        except GdrtError as e:
            raise GdrtError(str(e), path=source) from None


def check_parameter_names(params: dict, source: str) -> None:
    """Every key of a pipeline config that names a parameter, or a stage setting in a *_settings mapping, is
    text: a key YAML read as a number, true / false or null (`1:`, `on:`) is an error naming it (and the
    mapping it is under) and `source`."""
    from gdrt_core.config import check_text_keys

    check_text_keys(params, source, what="pipeline config")
    for key, value in params.items():
        if key.endswith("_settings") and isinstance(value, dict):
            check_text_keys(value, source, what="pipeline config", under=key)


def wired_settings(s, params: dict) -> dict[str, tuple[str, str]]:
    """The settings of step `s`'s stage that the pipeline gives the step itself, from its parameters, its
    constants, its inputs and its output: {config field: (what sets it, what to do instead)}."""
    from gdrt_core.embedded import BACKBONES
    from gdrt_core.stages import STEP_ARGUMENTS, base_model_settings
    from pipelines import graph

    field = STEP_ARGUMENTS.get(s.stage, {})
    drop = f"remove {s.settings}.{{key}}"
    wired = {field.get(arg, arg): (f"the pipeline parameter {param}",
                                   f"set `{param}: {{value}}` in the pipeline config or --set {param}={{value}}, and {drop}")
             for arg, param in s.params.items()}
    wired.update({field.get(arg, arg): (f"the pipeline, which always runs it with {arg} {value!r}", drop)
                  for arg, value in s.fixed.items()})
    wired.update({field.get(arg, arg): (f"the pipeline, which passes it the output of the {graph.step(src).display} "
                                        "step", drop) for arg, src in s.inputs.items()})
    wired["out"] = ("the runner, which chooses each step's output directory", drop)
    if s.stage == "init-model":  # base_model picks the backbone (and embedded:SIZE the size)
        base = str(params["base_model"] or "")
        for key in BACKBONES:
            wired[key] = ("the pipeline parameter base_model",
                          f"choose the backbone with `base_model: {key}:{{value}}`, and {drop}")
        if "size" in (base_model_settings(base) or {}):
            wired["size"] = (f"the pipeline parameter base_model ({base!r})",
                             "give the size once: `base_model: embedded:SIZE`, or `base_model: \"\"` with "
                             "model_settings.size")
    return wired


def check_wiring(p: dict, source: str) -> None:
    """A stage setting in a *_settings mapping that the pipeline sets itself for a step (train_settings.tau:
    the tau parameter; eval_settings.split: eval_split; train_settings.objective, *.out: the wiring) would be
    overridden silently: an error naming the setting, what sets it and what to do instead."""
    from pipelines import graph

    for s in graph.steps():
        if not s.settings:
            continue
        wired = wired_settings(s, p)
        for key, value in (p[s.settings] or {}).items():
            if key in wired:
                what, instead = wired[key]
                raise GdrtError(f"{s.settings}.{key} would be overridden: the {s.display} step gets its {key} "
                                f"from {what}", path=source, hint=instead.format(key=key, value=value))


def check_local_inputs(params: dict, source: str) -> None:
    """Before the first step of a local run: the whole config (`check_pipeline_params`), and the local
    paths it names (the source data, a base model given as a path) exist on this machine."""
    from gdrt_core.models import _looks_local
    from gdrt_core.stages import base_model_settings

    check_pipeline_params(params, source)
    data = str(params.get("source", PIPELINE_DEFAULTS["source"]))
    if not Path(data).expanduser().exists():
        relative = not Path(data).expanduser().is_absolute()
        raise GdrtError(f"the source data {data!r} does not exist" + (f" (relative to {Path.cwd()})" if relative else ""),
                        path=source, hint="set `source:` in the config or --set source=PATH" + (
                            "; a relative path in a config is relative to the current directory: the configs in "
                            "pipelines/configs/ are written for the repository root" if relative else ""))
    base = str(params.get("base_model") or "").strip()
    init_settings = base_model_settings(base)  # a form init-model builds; None for a directory or hub id
    if init_settings is not None:
        gguf = init_settings.get("gguf")
        if gguf and not Path(gguf).expanduser().is_file():
            raise GdrtError(f"the GGUF file {gguf!r} of base_model does not exist", path=source,
                            hint="set `base_model: gguf:/path/to/model.gguf`")
        return
    if _looks_local(base) and not Path(base).expanduser().exists():
        raise GdrtError(f"the base model directory {base!r} does not exist", path=source,
                        hint="set `base_model:` to a model directory or a hub id, or leave it empty")
