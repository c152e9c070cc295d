"""The pipeline graph (pipelines/graph.py) is the one description of the pipeline: the KFP pipelines, the
local run and the sweep resolve the same stage configs from it for the same variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from gdrt_core.config import to_dict
from gdrt_core.stages import STEP_KINDS, step_config
from pipelines import graph
from pipelines.params import PIPELINE_DEFAULTS, load_params

VARIANT = {"tau": 100.0, "prior": "size", "num_groups": 3, "deepspeed": "", "run_name": "office v",
           "train_settings": {"epochs": 2, "seed": 7}, "group_settings": {"batch_size": 8},
           "eval_settings": {"limit": 20}, "model_settings": {"size": "tiny", "seed": 1}}


def variant_params() -> dict:
    return {**PIPELINE_DEFAULTS, **load_params("pipelines/configs/quickstart.yaml", []), **VARIANT}


def resolved(stage: str, settings: dict, args: dict) -> dict:
    """What a runner hands one step: its config (stages with a config) or its arguments (report, register)."""
    config = step_config(stage, settings, args)
    return to_dict(config) if config is not None else {"settings": settings, **args}


def kfp_steps(pipeline, params: dict) -> dict[str, dict]:
    """{step: resolved} from a compiled KFP pipeline: each task's inputs (pipeline parameters, constants, the
    producing task of each artifact) with the variant's parameter values."""
    tasks = pipeline.pipeline_spec.root.dag.tasks
    by_display = {name: task.task_info.name for name, task in tasks.items()}
    step_of = {s.display: s for s in graph.steps()}
    out = {}
    for task in tasks.values():
        display = task.task_info.name.removesuffix(" (TrainJob)")
        if display not in step_of:
            continue  # the run-opening step
        s = step_of[display]
        args = {}
        declared = pipeline.pipeline_spec.components[task.component_ref.name].input_definitions.parameters
        for arg, value in task.inputs.parameters.items():
            if arg not in declared or arg in ("parent_run_id", "run_name"):
                continue  # KFP's own inputs (accelerator count, pipeline channels) and the run context
            if value.component_input_parameter:
                args[arg] = params.get(value.component_input_parameter)
            elif value.HasField("runtime_value"):
                args[arg] = value.runtime_value.constant  # a protobuf Value
                args[arg] = getattr(args[arg], args[arg].WhichOneof("kind"))
        for arg, value in task.inputs.artifacts.items():
            producer = by_display[value.task_output_artifact.producer_task].removesuffix(" (TrainJob)")
            args[arg] = f"<{step_of[producer].name}>"
        settings = args.pop("settings", None) or {}
        for key in ("num_nodes", "gpus_per_node", "runtime", "image", "pvc_name", "job_settings", "run_key"):
            args.pop(key, None)  # the multi-node launcher's own arguments
        if s.stage == "train" and "num_gpus" not in args:
            args["num_gpus"] = params["num_gpus"]  # multi-node: GPUs come from gpus_per_node; compared apart
        out[s.name] = resolved(s.stage, settings, {**args, "out": f"<{s.name}>"})
    return out


def planned_steps(plan_, variant: str) -> dict[str, dict]:
    """{step: resolved} from the executor's plan (the local run's and the sweep's), as run_spec calls it."""
    from pipelines.sweep import node_spec

    out = {}
    for step_name, key in plan_.roles[variant].items():
        node = plan_.nodes[key]
        spec = node_spec(plan_, key, Path("OUT"))
        inputs = {arg: f"<{plan_.nodes[k].step}>" for arg, k in node.inputs.items()}
        assert set(inputs) == set(spec["inputs"])
        out[step_name] = resolved(node.stage, spec["settings"], {**spec["args"], **inputs, "out": f"<{step_name}>"})
    return out


@pytest.fixture(scope="module")
def runners() -> dict[str, dict[str, dict]]:
    pytest.importorskip("kfp")
    from pipelines.gdrt_pipeline import build_pipeline
    from pipelines.local_run import VARIANT as RUN
    from pipelines.local_run import plan_run
    from pipelines.sweep import Variant, plan

    params = variant_params()
    sweep_plan = plan({"v": Variant("v", params, {}, "v")})
    sweep = planned_steps(sweep_plan, "v")
    sweep["report"]["title"] = params["run_name"]  # the sweep titles a variant's report `<run_name> <variant>`
    return {
        "kfp": kfp_steps(build_pipeline(cluster=True, checkpoint_pvc="pvc"), params),
        "kfp-local": kfp_steps(build_pipeline(cluster=False), params),
        "local run": planned_steps(plan_run(params), RUN),
        "sweep": sweep,
    }


def test_every_runner_resolves_the_same_stage_configs(runners):
    kfp = runners["kfp"]
    assert set(kfp) == {s.name for s in graph.steps()}
    for name, steps in runners.items():
        keys = set(kfp) - ({"register"} if name == "sweep" else set())  # a sweep registers nothing
        assert set(steps) == keys, name
        for step in keys:
            assert steps[step] == kfp[step], (name, step)


def test_sft_does_not_depend_on_the_gdrt_parameters(runners):
    """tau, prior and num_groups are GDRT's: the same SFT model whatever they are (and whoever runs it)."""
    sft, gdrt = runners["kfp"]["sft"], runners["kfp"]["gdrt"]
    assert (gdrt["tau"], gdrt["prior"], gdrt["num_groups"]) == (100.0, "size", 3)
    defaults = to_dict(step_config("train", {}, {"dataset": "d", "base": "b", "out": "o"}))
    assert (sft["tau"], sft["prior"], sft["num_groups"]) == (defaults["tau"], defaults["prior"], defaults["num_groups"])
    assert sft["epochs"] == 2 and sft["seed"] == 7 and sft["objective"] == "sft"


def test_the_multinode_pipeline_runs_the_same_graph(runners):
    pytest.importorskip("kfp.kubernetes")
    from pipelines.gdrt_pipeline_multinode import build_multinode_pipeline

    multinode = kfp_steps(build_multinode_pipeline(), variant_params())
    assert set(multinode) == set(runners["kfp"])
    for step, config in multinode.items():
        assert config == runners["kfp"][step], step


def test_the_graph_is_well_formed():
    names = [s.name for s in graph.STEPS]
    assert len(set(names)) == len(names)
    for i, s in enumerate(graph.STEPS):
        assert s.stage in STEP_KINDS
        assert all(src in names[:i] for src in (*s.inputs.values(), *s.after)), s.name  # inputs come first
        assert all(p in PIPELINE_DEFAULTS for p in s.params.values()) and (s.settings is None or s.settings in PIPELINE_DEFAULTS)
    from pipelines.sweep import STAGE_RANK

    assert set(STEP_KINDS) <= set(STAGE_RANK)  # the executor can order every step
    assert graph.steps("base")[3].inputs["reference"] == "base"
    assert "register" not in {s.name for s in graph.steps(register=False)}


def test_every_pipeline_parameter_reaches_a_step():
    used = {p for s in graph.STEPS for p in s.params.values()} | {s.settings for s in graph.STEPS if s.settings}
    assert set(PIPELINE_DEFAULTS) - used == {"experiment"}  # the parent run's, opened by each runner


def test_components_and_the_local_executor_call_run_step_alike(monkeypatch, tmp_path):
    """Each component's body, called with the arguments its KFP task gets, calls `run_step` exactly as the
    local executor does for the same step (stage, settings, arguments, parent run and run name)."""
    from types import SimpleNamespace

    pytest.importorskip("kfp")
    from gdrt_core import stages
    from pipelines.gdrt_pipeline import COMPONENTS
    from pipelines.local_run import VARIANT as RUN
    from pipelines.local_run import plan_run
    from pipelines.sweep import node_spec

    calls = []

    def record(stage, settings, context=None, **args):
        calls.append((stage, settings, context, args))
        return "decision" if stage == "register" else {}

    monkeypatch.setattr(stages, "run_step", record)
    params = variant_params()
    for step in graph.steps():
        args = {arg: SimpleNamespace(path=f"<{src}>") for arg, src in step.inputs.items()}
        args.update(graph.step_args(step, params))
        if step.settings:
            args["settings"] = params[step.settings]
        if step.tracked:
            args["parent_run_id"] = "parent"
        if step.run_name:
            args["run_name"] = step.run_name
        if step.output:
            args[step.output] = SimpleNamespace(path=f"<{step.name}>", metadata={})
        if step.stage == "evaluate":
            args["metrics"] = SimpleNamespace(log_metric=lambda key, value: None)
        COMPONENTS[step.stage].python_func(**args)

    plan_ = plan_run(params)
    out = tmp_path / "out"
    for (stage, settings, context, args), step in zip(calls, graph.steps(), strict=True):
        node = plan_.nodes[plan_.roles[RUN][step.name]]
        spec = node_spec(plan_, node.key, out, {"parent_run_id": "parent"})
        paths = {str(out / "stages" / plan_.nodes[k].dirname): f"<{plan_.nodes[k].step}>"
                 for k in node.inputs.values()}
        planned = {**spec["args"], **{a: paths[p] for a, p in spec["inputs"].items()}}
        if step.output:  # (the register step writes no artifact: its `out` is unused)
            planned["out"] = f"<{step.name}>"
        assert stage == node.stage, step.name
        assert (settings or {}) == spec["settings"], step.name
        assert {k: v for k, v in args.items() if v is not None} == planned, step.name
        if step.tracked:
            assert (context.parent_run_id, context.run_name) == ("parent", spec["context"]["run_name"]), step.name
