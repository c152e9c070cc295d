"""`gdrt run`: the whole pipeline on this machine.

The same graph the cluster runs (pipelines/graph.py, with the registry step), executed by the sweep's
executor (pipelines/sweep.py) as one variant: each step in its own process through
`gdrt_core.stages.run_step`, the function the pipeline's components call, so a step resolves the same
config here as in KFP. Independent steps run at once with `--jobs N` (default 1). Parameters come from a
YAML config (default: the quickstart.yaml in pipelines/configs/ beside this module, wherever the command is
started) and `--set key=value` overrides. Artifacts go under --out (default runs/<timestamp>):
<out>/stages/<step>, each step's log in <out>/logs/. MLflow logs to
MLFLOW_TRACKING_URI or the embedded sqlite store ./mlflow.db: the runner opens the parent run, nests every
step's run under it (run names as in KFP) and closes it as FINISHED or FAILED; with GDRT_TRACKING=off nothing
is logged or registered, and no store is opened or created. One progress line per step.
Re-running with the same --out and the same config resumes: finished steps are kept; <out>/params.json records
the parameters a directory was started with, and parameters that resolve to other settings are refused,
naming each difference (`check_same_config`). An --out that is neither new, empty nor an earlier run's working directory is refused
before the first step (`sweep.check_work_dir`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

from gdrt_core.errors import GdrtError
from pipelines.params import PIPELINE_DEFAULTS, check_local_inputs, config_source, load_params

TABLE = (("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10"), ("HR@5", "hr@5"), ("HR@10", "hr@10"),
         ("MGU@5", "mgu@5"), ("DGU@5", "dgu@5"), ("aux share", "aux_share"))
VARIANT = "run"


def plan_run(params: dict):
    """The pipeline's graph for one config as the executor's plan (one variant, registry step included)."""
    from pipelines import graph
    from pipelines.sweep import Plan, Variant, plan_steps

    params = {**PIPELINE_DEFAULTS, **params}
    nodes: dict = {}
    role = plan_steps(nodes, params, graph.steps(), lambda s: (s.display, s.run_name))
    return Plan(nodes, {VARIANT: role}, {VARIANT: Variant(VARIANT, params, {}, VARIANT)})


def run(params: dict, out: str | os.PathLike, *, jobs: int = 1, stream=None) -> dict:
    """Run the pipeline locally; returns the report's comparison (rows per model) and its directory."""
    from gdrt_core.artifacts import write_json_atomic
    from gdrt_core.tracking import RunContext, finish_run, start_pipeline_run
    from pipelines.sweep import RUN_PARAMS, _last_line, adopt_existing, check_work_dir, execute, node_dir

    out = Path(out).absolute()
    check_work_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan_ = plan_run(params)
    adopt_existing(plan_, out)
    check_same_config(out, plan_)
    p = plan_.variants[VARIANT].params
    write_json_atomic(out / RUN_PARAMS, p)
    print(f"gdrt run: pipeline on {p['source']} -> {out} (step logs: {out / 'logs'})", file=stream or sys.stderr)
    enabled = RunContext().enabled
    parent = start_pipeline_run(p["experiment"], p["run_name"],
                                {k: v for k, v in p.items() if not isinstance(v, dict)}) if enabled else ""
    try:
        status = execute(plan_, out, jobs, context={"parent_run_id": parent, "enabled": enabled,
                                                    "experiment": p["experiment"]}, stream=stream, title="gdrt run")
    except BaseException:
        finish_run(parent, "FAILED")
        raise
    failed = [plan_.nodes[k] for k, s in status.items() if s == "failed"]
    if failed or any(s != "done" for s in status.values()):
        finish_run(parent, "FAILED")
        node = failed[0] if failed else next(plan_.nodes[k] for k, s in status.items() if s != "done")
        log = out / "logs" / f"{node.dirname}.log"
        raise GdrtError(f"the pipeline failed at {node.label}: {_last_line(out, node)}", path=str(log),
                        hint="the step's full output is in this log; run the same command again to resume")
    finish_run(parent, "FINISHED")
    report_dir = node_dir(out, plan_.nodes[plan_.roles[VARIANT]["report"]])
    comparison = json.loads((report_dir / "comparison.json").read_text(encoding="utf-8"))
    dataset = node_dir(out, plan_.nodes[plan_.roles[VARIANT]["data"]])
    baseline = popularity_row(p, dataset, out / "baselines")
    return {**comparison, "rows": [*comparison["rows"], baseline], "report_dir": str(report_dir)}


def check_same_config(out: Path, plan_) -> None:
    """A run directory resumes only the config it was started with. Its params.json (`sweep.RUN_PARAMS`)
    records the pipeline parameters it was started with (defaults filled in); parameters that resolve to other
    values now (`params.resolved_params`: `tau: 1` is `tau: 1.0`, a stage setting written out at its default
    is the setting left out) are refused, naming the directory and each difference. A working directory
    without that record (a sweep's, or one from before it was kept) resumes only when every finished stage in
    it is a stage of this config."""
    from gdrt_core.config import flatten
    from pipelines.params import resolved_params
    from pipelines.sweep import RUN_PARAMS

    recorded = out / RUN_PARAMS
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            before = None
        if not isinstance(before, dict):
            raise GdrtError("the record of the parameters this run directory was started with cannot be read",
                            path=str(recorded), hint="choose a new --out")
        try:
            before = resolved_params(before, str(recorded))
        except GdrtError:  # recorded by a version whose settings this one reads otherwise: compared as written
            pass
        before = flatten(json.loads(json.dumps(before, default=str)))
        now = flatten(json.loads(json.dumps(resolved_params(plan_.variants[VARIANT].params), default=str)))

        def shown(values: dict, key: str) -> str:
            return repr(values[key]) if key in values else "the default"

        changed = [f"{k} {shown(before, k)} then, {shown(now, k)} now" for k in sorted({*before, *now})
                   if (k in before, before.get(k)) != (k in now, now.get(k))]
        if changed:
            more = f" (and {len(changed) - 8} more)" if len(changed) > 8 else ""
            raise GdrtError(f"the run directory was started with another config: {'; '.join(changed[:8])}{more}",
                            path=str(out), hint=f"to resume it, give it the config it was started with (its "
                                                f"parameters are in {recorded}); else choose a new --out")
        return
    keys = {key[:8] for key in plan_.nodes}
    names = [path.name[: -len(".done.json")] for path in (out / "stages").glob("*.done.json")]
    foreign = sorted(name for name in names if name.rsplit("-", 1)[-1] not in keys)
    if foreign:
        raise GdrtError(f"the working directory holds finished stages that this config does not have "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): it was made by another "
                        "config or by gdrt sweep", path=str(out), hint="choose a new --out")


def popularity_row(params: dict, dataset: Path, out: Path) -> dict:
    """The popularity baseline on the models' evaluation windows (same split, same limit), as a table row.

    Test is ranked by the valid period's most bought titles (`baseline:most-popular-valid`, the stronger of
    the two baselines, docs/results.md); valid by the training interactions (`baseline:most-popular`). A
    model that does not beat this row has learned no personalisation. Not tracked in MLflow; its Eval
    artifact goes to `out/<baseline>` (kept on resume)."""
    from gdrt_core.stages import run_stage
    from gdrt_core.tracking import RunContext

    split = params["eval_split"]
    model = "baseline:most-popular-valid" if split == "test" else "baseline:most-popular"
    target = out / model.split(":", 1)[1]
    metrics_path = target / "metrics.json"
    if not metrics_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        settings = {"limit": (params.get("eval_settings") or {}).get("limit"), "plots": False, "progress": False}
        run_stage("evaluate", settings, context=RunContext(enabled=False), dataset=str(dataset), model=model,
                  out=str(target), split=split)
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    return {"model": "popular", **{k: v for k, v in metrics.items() if isinstance(v, (int, float))}}


def format_table(comparison: dict) -> str:
    """The models' rows and the popularity row."""
    rows = comparison["rows"]
    head = f"{'model':<8}" + "".join(f"{h:>11}" for h, _ in TABLE)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[k]:>11.4f}" if isinstance(r.get(k), (int, float)) else f"{'—':>11}" for _, k in TABLE)
        lines.append(f"{r['model']:<8}{cells}")
    return "\n".join(lines)


def format_paired(comparison: dict) -> str:
    """Each model − the baseline on the same windows, from the report's paired comparisons (empty without)."""
    from gdrt_core.report import format_interval

    lines = []
    base = comparison.get("baseline")
    for label, p in (comparison.get("paired") or {}).items():
        if "difference" not in p:
            continue
        lines.append(f"{label} − {base} on the same {p['examples']} windows (95% bootstrap intervals; an interval "
                     "across 0 is no measured difference; lower MGU is fairer):")
        parts = []
        for m in ("ndcg@10", "hr@10", "mgu@5"):
            d = p["difference"][m]
            ci = "" if d["ci95"] is None else f" ({format_interval(d['ci95'])})"
            parts.append(f"{m.upper()} {d['value']:+.4f}{ci}")
        h = p["hits@10"]
        lines.append("  " + ", ".join(parts) + f"; windows hit in the top 10 by both {h['both']}, by {label} only "
                     f"{h['only_a']}, by {base} only {h['only_b']}")
    return "\n".join(lines)


def arguments(p: argparse.ArgumentParser) -> None:
    from gdrt_core.cli import user_path

    p.add_argument("--config", type=user_path, default=None,
                   help="pipeline config (default: the package's pipelines/configs/quickstart.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=user_path, default=None, help="working directory for artifacts: new, empty, or an "
                   "earlier run's, which resumes (default: runs/<timestamp>)")
    p.add_argument("--jobs", type=int, default=1, help="independent steps run at the same time (processes)")


def check_out_given(out: str | None) -> None:
    """`--out` of `gdrt run` / `gdrt sweep`: absent means the default folder, but an empty or blank one (an unset
    shell variable) is an error, not the default."""
    from gdrt_core.artifacts import check_path_given

    if out is not None:
        check_path_given(out, "--out", "the working directory",
                         hint="give the working directory, or leave --out out for the default under runs/")


def cli(args: argparse.Namespace) -> None:
    from gdrt_core.tracking import RunContext

    if args.jobs < 1:
        raise GdrtError(f"--jobs must be >= 1, got {args.jobs}", path="--jobs")
    check_out_given(args.out)
    params = load_params(args.config, args.overrides)
    check_local_inputs(params, config_source(args.config, args.overrides))
    out = Path(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    t0 = time.time()
    comparison = run(params, out, jobs=args.jobs)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print()
    print(format_table(comparison))
    print("popular = the popularity baseline on the same windows; a model below it has learned no personalisation.")
    if paired := format_paired(comparison):
        print(paired)
    if str(params.get("base_model", "")).split(":", 1)[0] in ("", "embedded"):
        print("The embedded model is trained from scratch: this run is a smoke run of the workflow, not a test of "
              "GDRT;\nthe experiment is pipelines/configs/office-smollm2.yaml (SmolLM2-135M, GPU), results in "
              "docs/results.md.")
    print()
    print(f"finished in {time.time() - t0:.0f} s; artifacts under {out}")
    print(f"report: {Path(comparison['report_dir']) / 'report.html'}")
    print(open_runs_line(uri, RunContext().enabled))


def mlflow_command() -> str:
    """How to start this environment's `mlflow`: `mlflow` when the shell finds it, else the script beside this
    Python (`.venv/bin/mlflow` after scripts/setup.sh, whose venv is not on PATH), relative to the working
    directory when it is below it."""
    import shutil

    if shutil.which("mlflow"):
        return "mlflow"
    script = Path(sys.executable).parent / "mlflow"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def open_runs_line(uri: str, enabled: bool = True) -> str:
    """The last line of `gdrt run`: the command that opens its MLflow runs, ready to copy (the store's URI
    shell-quoted: a working directory with spaces), or the server to open; with tracking off, that there are
    none."""
    import shlex

    from gdrt_core.tracking import DISABLE_ENV

    if not enabled:
        return f"MLflow tracking is off ({DISABLE_ENV}): nothing was logged or registered"
    if uri.startswith("sqlite:"):
        return f"open the runs: {shlex.quote(mlflow_command())} ui --backend-store-uri {shlex.quote(uri)}"
    return f"open the runs at {uri}"
