"""The pipeline's graph, written once, as data: its steps, the artifacts each reads, the pipeline parameters
each gets. Every runner is built from it:

- the KFP pipelines (pipelines/gdrt_pipeline.py, pipelines/gdrt_pipeline_multinode.py) make one task per
  step (`add_tasks`), the components' arguments named as here;
- the local run (`gdrt run`, pipelines/local_run.py) and the sweep (`gdrt sweep`, pipelines/sweep.py) plan
  one node per step and variant and run it with `gdrt_core.stages.run_step`, the function every component
  body calls;
- docker/docker-compose.yml is checked against it (tests/unit/test_docker.py).

A step's arguments: `inputs` (argument -> the step whose output artifact it reads), `params` (argument ->
pipeline parameter), `fixed` (constants), and `settings` (the pipeline parameter holding the stage's
settings dict). The stage kind names a stage of `gdrt_core.stages.STAGES`, or report / register. The run
context (parent MLflow run, run name) is not an argument here: each runner passes it to the step.

This module imports neither kfp nor torch: the local runners use it without kfp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    name: str  # the step's id, e.g. "sft" (the sweep's role name)
    stage: str  # stage kind: a gdrt_core.stages.STAGES key, "report" or "register"
    display: str  # display name in the KFP UI and in the local run's progress lines
    label: str  # the sweep's node label (before the variant's or domain's name)
    output: str | None  # the output artifact's name (the component's Output argument)
    inputs: dict[str, str] = field(default_factory=dict)  # argument -> step whose output it reads
    params: dict[str, str] = field(default_factory=dict)  # argument -> pipeline parameter
    settings: str | None = None  # the pipeline parameter with the stage's settings
    fixed: dict[str, Any] = field(default_factory=dict)  # constant arguments
    run_name: str = ""  # the stage's MLflow run name ("" = the stage's name)
    tracked: bool = True  # gets the parent MLflow run
    cache: bool = False  # KFP caching (off for training, evaluation, report and register)
    after: tuple[str, ...] = ()  # steps it waits for without reading their output
    per_domain: bool = False  # shared by every variant of a domain (the sweep names it after the domain)


def _evaluated(model: str) -> tuple[Step, Step]:
    """The test-split evaluation and the attribution of one trained model (step `model`)."""
    return (
        Step(f"eval_{model}", "evaluate", f"evaluate {model.upper()}", f"evaluate {model}", "evaluation",
             inputs={"dataset": "data", "model": model}, params={"split": "eval_split"}, settings="eval_settings",
             run_name=f"evaluate {model}"),
        Step(f"attr_{model}", "attribute", f"attribute {model.upper()}", f"attribute {model}", "attribution",
             inputs={"dataset": "data", "model": model, "groups": "groups"}, params={"split": "eval_split"},
             settings="attribute_settings", run_name=f"attribute {model}", cache=True),
    )


STEPS: tuple[Step, ...] = (
    Step("data", "curate", "curate", "curate", "dataset", params={
        "source": "source", "source_format": "source_format", "domain": "domain"},
        settings="curate_settings", cache=True, per_domain=True),
    Step("base", "init-model", "base model", "base model", "model", inputs={"dataset": "data"},
         params={"base_model": "base_model"}, settings="model_settings", tracked=False, cache=True, per_domain=True),
    Step("sft", "train", "train SFT", "train sft", "model", inputs={"dataset": "data", "base": "base"},
         params={"num_gpus": "num_gpus", "deepspeed": "deepspeed"}, settings="train_settings",
         fixed={"objective": "sft"}, run_name="train sft"),
    Step("groups", "group", "group (reference = SFT)", "group", "groups",
         inputs={"dataset": "data", "reference": "sft"}, params={"num_groups": "num_groups"},
         settings="group_settings", cache=True),
    # tau, prior and num_groups are GDRT's: the SFT step does not get them (the same SFT model, whoever runs it)
    Step("gdrt", "train", "train GDRT", "train gdrt", "model",
         inputs={"dataset": "data", "base": "base", "groups": "groups"},
         params={"tau": "tau", "prior": "prior", "num_groups": "num_groups", "num_gpus": "num_gpus",
                 "deepspeed": "deepspeed"},
         settings="train_settings", fixed={"objective": "gdrt"}, run_name="train gdrt"),
    *_evaluated("sft"),
    *_evaluated("gdrt"),
    Step("report", "report", "report", "report", "page",
         inputs={"dataset": "data", "sft_eval": "eval_sft", "gdrt_eval": "eval_gdrt", "sft_attribution": "attr_sft",
                 "gdrt_attribution": "attr_gdrt"}, params={"title": "run_name"}),
    Step("valid_gdrt", "evaluate", "evaluate GDRT (valid)", "evaluate gdrt valid", "evaluation",
         inputs={"dataset": "data", "model": "gdrt"}, settings="valid_eval_settings", fixed={"split": "valid"},
         run_name="evaluate gdrt (valid)"),
    Step("register", "register", "register", "register", None,
         inputs={"model": "gdrt", "dataset": "data", "valid_eval": "valid_gdrt"}, params={"domain": "domain"},
         after=("report",)),
)
REFERENCES = ("sft", "base")  # the grouping reference: the SFT model (the method) or the base model (ablation)


def steps(reference: str = "sft", *, register: bool = True) -> tuple[Step, ...]:
    """The graph's steps in dependency order; `reference` = the step whose model the group step scores with;
    `register=False` leaves out the registry step (a sweep compares, it does not promote)."""
    if reference not in REFERENCES:
        raise ValueError(f"reference {reference!r} is not one of {REFERENCES}")
    out = []
    for step in STEPS:
        if step.stage == "register" and not register:
            continue
        if step.name == "groups" and reference != "sft":
            step = dataclasses.replace(step, inputs={**step.inputs, "reference": reference},
                                       display=f"group (reference = {reference})")
        out.append(step)
    return tuple(out)


def step(name: str) -> Step:
    return next(s for s in STEPS if s.name == name)


def step_args(s: Step, params: dict[str, Any]) -> dict[str, Any]:
    """The step's non-artifact arguments for these pipeline parameters."""
    return {**{arg: params[p] for arg, p in s.params.items()}, **s.fixed}


def step_settings(s: Step, params: dict[str, Any]) -> dict[str, Any]:
    return dict(params[s.settings] or {}) if s.settings else {}


def add_tasks(params: dict[str, Any], parent: Any, make_task, *, display_suffix: dict[str, str] | None = None) -> dict:
    """Inside a KFP pipeline function: one task per step, in order. `params` maps pipeline parameter names to
    the pipeline function's arguments; `make_task(step, args)` calls the step's component with `args` (and
    any cluster settings) and returns the task. Returns {step name: task}."""
    tasks: dict[str, Any] = {}
    for s in STEPS:
        args = {arg: tasks[src].outputs[step(src).output] for arg, src in s.inputs.items()}
        args.update(step_args(s, params))
        if s.settings:
            args["settings"] = params[s.settings]
        if s.tracked:
            args["parent_run_id"] = parent
        if s.run_name:
            args["run_name"] = s.run_name
        task = make_task(s, args)
        task.set_display_name(s.display + (display_suffix or {}).get(s.stage, ""))
        if not s.cache:
            task.set_caching_options(enable_caching=False)
        for name in s.after:
            task.after(tasks[name])
        tasks[s.name] = task
    return tasks
