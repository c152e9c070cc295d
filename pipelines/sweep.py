"""`gdrt sweep`: many variants of one pipeline config (seeds, ablations), run with the pipeline's wiring.

A sweep file names a pipeline config (the YAML `gdrt run` takes) and variants, each a set of overrides:

    config: office.yaml              # relative to the sweep file
    experiment: gdrt-office-sweep    # MLflow experiment of the sweep's runs
    set: {train_settings.epochs: 3}  # overrides every variant gets
    variants:
      seed42: {pool: default}
      seed43: {pool: default, set: {train_settings.seed: 43, model_settings.seed: 1}}
      tau100: {set: {tau: 100}}
      ref-base: {reference: base}    # group with the base model instead of SFT

Each variant is the pipeline's graph (pipelines/graph.py) without the registry step: curate -> base model
-> train SFT -> group (reference = SFT, or the base model) -> train GDRT -> evaluate both on `eval_split` ->
attribute both -> report, plus GDRT on valid. Each step runs through `gdrt_core.stages.run_step`, the
function the pipeline's components call, with the same arguments. A stage that several variants share (same
stage, settings as they resolve, `tau: 1` = `tau: 1.0`, and inputs: the SFT model of an ablation that changes
only GDRT, say) runs once. Independent stages run in parallel, one process each
(`--jobs`). A finished stage is not run again: re-running the same command after a crash resumes.
Nothing is registered: a sweep compares configurations, it does not promote a model. A variant's report is
titled `<run_name> <variant>`.

The executor (`plan_steps`, `execute`) also runs `gdrt run` (pipelines/local_run.py): one variant, with
the registry step.

Results: <out>/results.json (per variant: overrides, the SFT and GDRT rows, GDRT's valid metrics),
<out>/results.md (per-variant table, and the variants of one `pool` as mean ± std) and <out>/results.png
(NDCG@10, MGU@5 and the auxiliary share per pool, error bars = std). With tracking on,
one parent MLflow run per sweep, the stages nested under it, and one summary run per variant.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gdrt_core import config as cfg
from gdrt_core.errors import GdrtError
from pipelines import graph

REFERENCES = graph.REFERENCES


@dataclass
class Variant:
    name: str
    params: dict  # the pipeline parameters, defaults filled in
    overrides: dict  # what this variant sets (sweep-wide and its own), for the tables and MLflow
    pool: str
    reference: str = "sft"


@dataclass
class Node:
    key: str
    stage: str  # curate | init-model | train | group | evaluate | attribute | report | register
    label: str
    settings: dict = field(default_factory=dict)
    args: dict = field(default_factory=dict)  # the step's plain arguments (pipelines/graph.py), as a component gets them
    inputs: dict = field(default_factory=dict)  # argument -> key of the node whose output it takes
    step: str = ""  # the graph step it runs
    run_name: str = ""  # its MLflow run name ("" = the stage's name)
    after: list = field(default_factory=list)  # keys of nodes it waits for without reading them (register)

    def deps(self) -> list[str]:
        return [*self.inputs.values(), *self.after]
    dirname: str = ""  # <label slug>-<key prefix>; an earlier sweep's name for the same key is adopted

    def __post_init__(self):
        if not self.dirname:
            slug = re.sub(r"[^A-Za-z0-9]+", "-", self.label).strip("-").lower()
            self.dirname = f"{slug}-{self.key[:8]}"


@dataclass
class Plan:
    nodes: dict[str, Node]  # in dependency order
    roles: dict[str, dict[str, str]]  # variant -> role -> node key
    variants: dict[str, Variant]


@dataclass
class VariantSpec:
    """One variant of a sweep file (`variants: {NAME: {set, pool, reference}}`)."""

    set: dict = cfg.field({}, help="pipeline parameters of this variant (dotted keys), after the sweep's own `set`")
    pool: str | None = cfg.field(None, help="the variants of one pool are pooled as mean ± std (default: its name)")
    reference: str = cfg.field("sft", choices=graph.REFERENCES,
                               help="the grouping reference: sft (the method) or base (the ablation)")


@dataclass
class SweepSpec:
    """A sweep file, read as a typed config: a wrong type or an unknown key is an error naming it."""

    config: str | None = cfg.field(None, path=True, help="the pipeline config the variants start from (relative to "
                                   "the sweep file)")
    variants: dict = cfg.field({}, help="variant name -> its set / pool / reference")
    experiment: str | None = cfg.field(None, help="MLflow experiment of the sweep's runs")
    set: dict = cfg.field({}, help="pipeline parameters every variant gets")


def _given(spec: dict) -> dict:
    """The keys a sweep file (or one variant) gives a value: an empty `set:` is no set."""
    return {k: v for k, v in spec.items() if v is not None}


# a variant name becomes part of file names (its stages' directories, logs, done markers: <label slug>-<key>)
# and is typed after --only: short, and letters, digits, '.', '_', '-' only
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_VARIANT_NAME = 64


def check_variant_name(name: str, where: str) -> None:
    """Refuse, before any stage runs, a variant name too long for the file names made from it, or with a
    character that is not a letter, digit, '.', '_' or '-' (a 300-character name failed with "file name too
    long" after the shared stages had run)."""
    shown = name if len(name) <= 40 else f"{name[:40]}..."
    if len(name) > MAX_VARIANT_NAME:
        raise GdrtError(f"variant name {shown!r} has {len(name)} characters, more than {MAX_VARIANT_NAME}",
                        path=where, hint="give it a short name: it names the variant's stage directories and logs")
    if not VARIANT_NAME.fullmatch(name):
        raise GdrtError(f"variant name {shown!r} is not a safe file name", path=where,
                        hint="use letters, digits, '.', '_' and '-', starting with a letter or digit")


def _set_param(params: dict, key: str, value: Any, where: str) -> None:
    """A pipeline parameter (dotted into its settings dict); an unknown parameter name is an error."""
    from gdrt_core.config import set_dotted
    from pipelines.params import PIPELINE_DEFAULTS

    if key.split(".")[0] not in PIPELINE_DEFAULTS:
        raise GdrtError(f"unknown pipeline parameter {key.split('.')[0]!r} (known: "
                        f"{', '.join(PIPELINE_DEFAULTS)})", path=where)
    set_dotted(params, key, copy.deepcopy(value), where)  # a mapping shared by variants must not be mutated


def load_sweep(path: str | os.PathLike, overrides: list[str] = (), only: list[str] | None = None
               ) -> tuple[str, dict[str, Variant]]:
    """(experiment, variants) from a sweep file; `overrides` (key=value) apply to every variant."""
    from gdrt_core.config import read_yaml
    from pipelines.params import PIPELINE_DEFAULTS, check_pipeline_params, load_params, override

    path = Path(path)
    spec = cfg.from_dict(SweepSpec, _given(read_yaml(path, "sweep file")), source=str(path))
    if not spec.config:
        raise GdrtError("`config` (the pipeline config the variants start from) is missing", path=str(path))
    if not spec.variants:
        raise GdrtError("`variants` must map at least one variant name to its settings", path=str(path))
    named = variant_names(spec.variants, str(path))
    cfg.check_text_keys(spec.set, str(path), what="sweep file", under="set", kind="pipeline parameter name")
    config_path = path.parent / spec.config  # an absolute config stays itself
    base = {**copy.deepcopy(PIPELINE_DEFAULTS), **load_params(config_path, [])}
    common = dict(spec.set)
    common.update(override(item) for item in overrides)
    if only:
        missing = [v for v in only if v not in named]
        if missing:
            raise GdrtError(f"no variant {missing} (variants: {', '.join(named)})", path=str(path))
    variants: dict[str, Variant] = {}
    for name, given in named.items():
        if only and name not in only:
            continue
        where = f"{path}: variant {name}"
        check_variant_name(name, str(path))
        if not isinstance(given or {}, dict):
            raise GdrtError(f"must be a mapping of set / pool / reference, not {given!r}", path=where,
                            hint=f"write it as `{name}: {{set: {{KEY: VALUE}}}}`, or `{name}: {{}}` for the config as it is")
        vspec = cfg.from_dict(VariantSpec, _given(given or {}), source=where)
        cfg.check_text_keys(vspec.set, str(path), what="sweep file", under=f"variants.{name}.set",
                            kind="pipeline parameter name")
        params = copy.deepcopy(base)
        own = {**common, **vspec.set}
        for key, value in own.items():
            _set_param(params, key, value, where)
        check_pipeline_params(params, where)  # every variant's every stage, before the first stage runs
        variants[name] = Variant(name, params, own, vspec.pool or name, vspec.reference)
    return spec.experiment or base.get("experiment") or "gdrt", variants


def variant_names(variants: dict, source: str) -> dict[str, Any]:
    """The variants of a sweep file keyed by their names as text: YAML reads `42:` as the integer 42, which
    names the variant "42"; a name YAML reads as true / false, null or a decimal number (`on:`, `1.10:`,
    whose text is not what was written) is an error naming it, and so are two keys that name one variant
    (`42:` and `"42":`)."""
    named: dict[str, Any] = {}
    keys: dict[str, object] = {}  # name -> the key that gave it
    for name, given in variants.items():
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            cfg.check_text_keys({name: given}, source, what="sweep file", under="variants", kind="variant name")
        if str(name) in named:
            raise GdrtError(f"two variants are named {str(name)!r} (the keys {keys[str(name)]!r} and {name!r})",
                            path=source, hint="give each variant its own name")
        named[str(name)], keys[str(name)] = given, name
    return named


def _key(stage: str, settings: dict, values: dict, inputs: dict) -> str:
    blob = json.dumps({"stage": stage, "settings": settings, "values": values, "inputs": inputs},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def plan_steps(nodes: dict[str, Node], params: dict, steps: tuple[graph.Step, ...],
               name: Callable[[graph.Step], tuple[str, str]]) -> dict[str, str]:
    """Add one node per graph step for one variant's `params` (a node with the same stage, settings and
    inputs is the same node: shared); returns {step name: node key}. `name(step)` gives the node's
    (label, MLflow run name). The key is over what the stage sees: its settings and config values (step
    arguments renamed as `stages.step_values` does) as they resolve (`params.resolved_params`: `tau: 1` and
    `tau: 1.0`, or a default written out and left out, are one stage), and its inputs' keys."""
    from gdrt_core.stages import STEP_ARGUMENTS, step_values
    from pipelines.params import resolved_params

    resolved = resolved_params(params)
    role: dict[str, str] = {}
    for s in steps:
        settings, args = graph.step_settings(s, params), graph.step_args(s, params)
        renames = STEP_ARGUMENTS.get(s.stage, {})
        inputs = {arg: role[src] for arg, src in s.inputs.items()}
        key = _key(s.stage, graph.step_settings(s, resolved), step_values(s.stage, graph.step_args(s, resolved)),
                   {renames.get(a, a): k for a, k in inputs.items()})
        if key not in nodes:
            label, run_name = name(s)
            nodes[key] = Node(key, s.stage, label, settings, args, inputs, s.name, run_name,
                              [role[a] for a in s.after])
        role[s.name] = key
    return role


def plan(variants: dict[str, Variant]) -> Plan:
    """The stage graph of all variants, shared stages merged (pure: no file is touched)."""
    nodes: dict[str, Node] = {}
    roles: dict[str, dict[str, str]] = {}
    for name, v in variants.items():
        params = {**v.params, "run_name": f"{v.params['run_name']} {name}"}  # the variant's report title

        def label(s: graph.Step, name=name, domain=v.params["domain"]) -> tuple[str, str]:
            text = f"{s.label} {domain if s.per_domain else name}"
            return text, text

        roles[name] = plan_steps(nodes, params, graph.steps(v.reference, register=False), label)
    return Plan(nodes, roles, variants)


RUN_PARAMS = "params.json"  # gdrt run's record of the parameters its working directory was started with


def check_work_dir(out: Path) -> None:
    """Refuse, before any work, an --out that is a directory holding other things than an earlier run of this
    executor (`gdrt run` or `gdrt sweep`), whose stages/*.done.json, logs/*.spec.json or (gdrt run)
    params.json mark it: that one resumes; a new or empty directory starts a run; anything else would get the
    run's files mixed into it."""
    if not out.is_dir():
        return  # new (created by the run); a file is refused by the file system, naming it
    entries = sorted(p.name for p in out.iterdir())
    if (not entries or any((out / "stages").glob("*.done.json")) or any((out / "logs").glob("*.spec.json"))
            or (out / RUN_PARAMS).is_file()):
        return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise GdrtError(f"the output directory is not empty (it holds {shown}) and is not an earlier run's working "
                    "directory (no stages/*.done.json or logs/*.spec.json)", path=str(out),
                    hint="choose a new or empty --out; to resume a run, give the --out it wrote to")


def adopt_existing(plan_: Plan, out: Path) -> None:
    """Find each node's earlier output by its key, whatever it was named after: a stage first run by a
    sweep over other variants (or another `--only`) carries another variant's name. Finished stages win
    over unfinished directories."""
    stages = out / "stages"
    if not stages.is_dir():
        return
    finished, started = {}, {}
    for path in stages.iterdir():
        if path.name.startswith("."):
            continue
        if path.name.endswith(".done.json"):
            name = path.name[: -len(".done.json")]
            finished.setdefault(name.rsplit("-", 1)[-1], name)
        elif path.is_dir():
            started.setdefault(path.name.rsplit("-", 1)[-1], path.name)
    for node in plan_.nodes.values():
        name = finished.get(node.key[:8]) or started.get(node.key[:8])
        if name:
            node.dirname = name


def node_dir(out: Path, node: Node) -> Path:
    return out / "stages" / node.dirname


def done_path(out: Path, node: Node) -> Path:
    """Written (atomically) once the node's stage has finished: its scalars and wall seconds."""
    return out / "stages" / f"{node.dirname}.done.json"


def node_spec(plan_: Plan, key: str, out: Path, context: dict | None = None, command: str = "gdrt sweep") -> dict:
    """What the node's process needs: the stage, its settings and arguments, its inputs as paths, its MLflow
    run context (`context`: parent_run_id, enabled, experiment; the run name is the node's), and the command
    that runs it (`gdrt run` or `gdrt sweep`, which labels its errors)."""
    node = plan_.nodes[key]
    return {"key": key, "command": command, "stage": node.stage, "label": node.label, "settings": node.settings,
            "args": node.args, "out": str(node_dir(out, node)), "done": str(done_path(out, node)),
            "inputs": {name: str(node_dir(out, plan_.nodes[k])) for name, k in node.inputs.items()},
            "context": {**(context or {}), "run_name": node.run_name}}


def run_spec(spec: dict) -> dict:
    """Run one node's step in this process, as the pipeline's component for that step would."""
    from gdrt_core.artifacts import write_json_atomic
    from gdrt_core.stages import run_step
    from gdrt_core.tracking import RunContext

    t0 = time.time()
    result = run_step(spec["stage"], spec["settings"], RunContext(**spec["context"]), **spec["args"],
                      **spec["inputs"], out=spec["out"])
    write_json_atomic(spec["done"], {"label": spec["label"], "seconds": round(time.time() - t0, 1),
                                     "result": result})
    return result


# trainings first (everything waits on them), then the cheap evaluations, then the attributions
STAGE_RANK = {"curate": 0, "init-model": 0, "train": 0, "group": 0, "evaluate": 1, "attribute": 2, "report": 3,
              "register": 3}


def step_env(environ, jobs: int, cpus: int | None = None) -> dict[str, str]:
    """The environment of a step's process: `environ`, unbuffered output, and with `jobs` > 1 the CPU cores
    shared out between the steps that run at once (OMP_NUM_THREADS = cores // jobs, at least 1) unless
    OMP_NUM_THREADS is set already to a positive count. Two steps with a thread per core each would run 2 x cores OpenMP threads,
    whose barriers wait for descheduled threads (docs/benchmarks.md: a 40x slower matmul under load); a
    stage's own thread setting (train `cpu_threads`, evaluate `threads`) still wins."""
    env = {**environ, "PYTHONUNBUFFERED": "1"}
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if jobs > 1 and not (given.isdigit() and int(given) > 0):  # unset, empty or not a count: OpenMP would ignore it
        from gdrt_core.models import available_cores

        cores = cpus if cpus is not None else available_cores()
        env["OMP_NUM_THREADS"] = str(max(1, cores // jobs))
    return env


def execute(plan_: Plan, out: Path, jobs: int = 1, *, context: dict | None = None, stream=None,
            title: str = "gdrt sweep") -> dict[str, str]:
    """Run the plan's unfinished nodes, `jobs` processes at a time, inputs first; returns {key: status}
    (done | failed | skipped). A failed node skips what depends on it; the rest goes on. `context` (the
    parent run id, tracking on/off, experiment) goes to every node in its spec. Progress lines go to `stream`
    (default: sys.stderr as it is at the call); `title` is the command (`gdrt run`, `gdrt sweep`) that labels
    them and the nodes' errors."""
    from gdrt_core.cli import terminate_unwinds

    stream = stream or sys.stderr
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    nodes = plan_.nodes
    status = {k: "done" for k, n in nodes.items() if done_path(out, n).is_file()}
    pending = [k for k in nodes if k not in status]
    order = {k: i for i, k in enumerate(nodes)}
    total, finished, t_start = len(pending), 0, time.time()
    print(f"{title}: {len(nodes)} stages for {len(plan_.variants)} variant(s), {len(status)} already done, "
          f"{total} to run, {jobs} at a time; logs in {out / 'logs'}", file=stream, flush=True)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}

    def report(key: str, state: str, seconds: float) -> None:
        nonlocal finished
        finished += 1
        print(f"[{finished:3d}/{total}] {nodes[key].label:<34} {state:<8} {seconds:7.1f} s "
              f"(total {time.time() - t_start:7.1f} s)", file=stream, flush=True)

    # SIGTERM (a scheduler's stop, `kill`) stops the run like Ctrl-C: running stages are terminated and the
    # results so far are written
    with terminate_unwinds():
        try:
            while pending or running:
                for key in list(pending):  # in dependency order, so skips propagate in one pass
                    deps = nodes[key].deps()
                    if any(status.get(d) in ("failed", "skipped") for d in deps):
                        status[key] = "skipped"
                        pending.remove(key)
                        report(key, "SKIPPED", 0.0)
                ready = sorted((k for k in pending if all(status.get(d) == "done" for d in nodes[k].deps())),
                               key=lambda k: (STAGE_RANK[nodes[k].stage], order[k]))
                for key in ready[: max(0, jobs - len(running))]:
                    pending.remove(key)
                    spec_path = out / "logs" / f"{nodes[key].dirname}.spec.json"
                    spec_path.write_text(json.dumps(node_spec(plan_, key, out, context, title), indent=2, default=str),
                                         encoding="utf-8")
                    log = open(out / "logs" / f"{nodes[key].dirname}.log", "ab")  # noqa: SIM115 - closed when it ends
                    child_env = step_env(os.environ, jobs)
                    proc = subprocess.Popen([sys.executable, "-m", "pipelines.sweep", "--node", str(spec_path)],
                                            stdout=log, stderr=subprocess.STDOUT, env=child_env)
                    running[key] = (proc, time.time(), log)
                for key, (proc, t0, log) in list(running.items()):
                    rc = proc.poll()
                    if rc is None:
                        continue
                    log.close()
                    del running[key]
                    ok = rc == 0 and done_path(out, nodes[key]).is_file()
                    status[key] = "done" if ok else "failed"
                    report(key, "SUCCESS" if ok else f"FAILED ({rc})", time.time() - t0)
                    if not ok:
                        print(f"    see {out / 'logs' / (nodes[key].dirname + '.log')}: {_last_line(out, nodes[key])}",
                              file=stream, flush=True)
                if not ready or len(running) >= jobs:
                    time.sleep(0.2)
        except BaseException:
            for proc, _, _log in running.values():
                proc.terminate()
            for proc, _, log in running.values():
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
            raise
    return status


def _last_line(out: Path, node: Node) -> str:
    path = out / "logs" / f"{node.dirname}.log"
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "(empty log)"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def model_row(out: Path, plan_: Plan, role: dict, label: str) -> dict:
    """One model's row from whatever of its stages finished: test metrics, aux share, train s/epoch."""
    from gdrt_core.results import train_s_per_epoch

    nodes = plan_.nodes
    row: dict[str, Any] = {"model": label.upper()}
    if done_path(out, nodes[role[f"eval_{label}"]]).is_file():
        row.update(_read_json(node_dir(out, nodes[role[f"eval_{label}"]]) / "metrics.json") or {})
    attr = _read_json(node_dir(out, nodes[role[f"attr_{label}"]]) / "summary.json") \
        if done_path(out, nodes[role[f"attr_{label}"]]).is_file() else None
    row["aux_share"] = (attr or {}).get("aux_share")
    if done_path(out, nodes[role[label]]).is_file():
        row["train_s_per_epoch"] = train_s_per_epoch(node_dir(out, nodes[role[label]]))
    return row


def collect(plan_: Plan, out: Path) -> dict:
    """Per variant: its overrides, reference, pool, the SFT and GDRT rows, GDRT's valid metrics, and the
    keys of its SFT and GDRT trainings (shared trainings have the same key)."""
    results = {}
    for name, role in plan_.roles.items():
        v = plan_.variants[name]
        valid_node = plan_.nodes[role["valid_gdrt"]]
        results[name] = {
            "overrides": v.overrides, "reference": v.reference, "pool": v.pool,
            "sft": model_row(out, plan_, role, "sft"), "gdrt": model_row(out, plan_, role, "gdrt"),
            "gdrt_valid": _read_json(node_dir(out, valid_node) / "metrics.json")
            if done_path(out, valid_node).is_file() else None,
            "sft_key": role["sft"], "gdrt_key": role["gdrt"],
        }
    return results


def pooled_rows(results: dict) -> dict[str, list[dict]]:
    """{'<pool> SFT' / '<pool> GDRT': rows}: the variants of a pool pooled; an SFT training shared with
    an earlier pool (the same model) is not listed again."""
    pooled: dict[str, list[dict]] = {}
    seen_sft: set[str] = set()
    for pool in dict.fromkeys(r["pool"] for r in results.values()):
        members = [r for r in results.values() if r["pool"] == pool]
        sft_rows = {r["sft_key"]: r["sft"] for r in members}
        if not set(sft_rows) <= seen_sft:
            pooled[f"{pool} SFT"] = list(sft_rows.values())
            seen_sft |= set(sft_rows)
        pooled[f"{pool} GDRT"] = [r["gdrt"] for r in members]
    return pooled


def results_markdown(results: dict, title: str) -> str:
    from gdrt_core.results import COLUMNS, markdown

    lines = [f"# {title}", "", "## Variants pooled (mean ± sample std over the variants of a pool)", "",
             markdown(pooled_rows(results)), "", "## Every variant", "",
             "| variant | overrides | reference | model | " + " | ".join(h for h, _ in COLUMNS) + " | valid NDCG@10 |",
             "| --- | --- | --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: |"]
    for name, r in results.items():
        overrides = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "—"
        for label in ("sft", "gdrt"):
            row = r[label]
            cells = [f"{row[k]:.0f}" if k == "train_s_per_epoch" and isinstance(row.get(k), (int, float))
                     else f"{row[k]:.4f}" if isinstance(row.get(k), (int, float)) else "—" for _, k in COLUMNS]
            valid = (r["gdrt_valid"] or {}).get("ndcg@10") if label == "gdrt" else None
            valid_cell = f"{valid:.4f}" if isinstance(valid, (int, float)) else "—"
            lines.append(f"| {name} | {overrides} | {r['reference']} | {label.upper()} | " + " | ".join(cells)
                         + f" | {valid_cell} |")
    lines.append("")
    return "\n".join(lines)


def _log_variants(parent: str, experiment: str, results: dict, out: Path, plan_: Plan) -> None:
    """One MLflow run per variant under the sweep's parent run: overrides as params, test metrics."""
    from gdrt_core.config import flatten
    from gdrt_core.tracking import end_run, start_run

    for name, r in results.items():
        tracker = start_run(name, parent_run_id=parent, experiment=experiment, tags={"gdrt.stage": "sweep variant"})
        tracker.log_params({**flatten(r["overrides"]), "reference": r["reference"], "pool": r["pool"]})
        metrics = {}
        for label in ("sft", "gdrt"):
            metrics.update({f"{label}_{k}": v for k, v in r[label].items() if isinstance(v, (int, float))})
        metrics.update({f"gdrt_valid_{k}": v for k, v in (r["gdrt_valid"] or {}).items() if isinstance(v, (int, float))})
        tracker.log_metrics({k.replace("@", "_at_"): v for k, v in metrics.items()})
        report = plan_.nodes[plan_.roles[name]["report"]]
        if done_path(out, report).is_file():
            tracker.log_artifacts(node_dir(out, report), "report")
        end_run(tracker)


def run(sweep_file: str, out: str | os.PathLike, *, jobs: int = 1, overrides: list[str] = (),
        only: list[str] | None = None, dry_run: bool = False, stream=None) -> dict:
    """Plan, run and collect a sweep; returns the per-variant results (written to <out>/results.*)."""
    stream = stream or sys.stderr
    from gdrt_core.artifacts import atomic_file, write_json_atomic
    from gdrt_core.tracking import RunContext, finish_run, start_pipeline_run

    experiment, variants = load_sweep(sweep_file, list(overrides), only)
    plan_ = plan(variants)
    out = Path(out)
    check_work_dir(out)
    adopt_existing(plan_, out)
    if dry_run:
        for key, node in plan_.nodes.items():
            users = [n for n, role in plan_.roles.items() if key in role.values()]
            deps = ", ".join(plan_.nodes[k].label for k in node.inputs.values()) or "—"
            print(f"{node.label:<34} <- {deps}   (variants: {', '.join(users)})", file=stream)
        return {}
    parent, enabled = "", RunContext().enabled
    if enabled:
        parent = start_pipeline_run(experiment, f"sweep {Path(sweep_file).stem}",
                                    {"sweep": str(sweep_file), "variants": ",".join(variants), "out": str(out)})
    status: dict[str, str] = {}
    try:
        status = execute(plan_, out, jobs, context={"parent_run_id": parent, "enabled": enabled,
                                                    "experiment": experiment}, stream=stream)
    finally:
        results = collect(plan_, out)
        write_json_atomic(out / "results.json", results)
        with atomic_file(out / "results.md") as tmp:
            tmp.write_text(results_markdown(results, f"gdrt sweep {Path(sweep_file).name}"), encoding="utf-8")
        pooled = pooled_rows(results)
        if any(isinstance(r.get("ndcg@10"), float) for rows in pooled.values() for r in rows):
            from gdrt_core.results import plot

            plot(pooled, out / "results.png")
        failed = [plan_.nodes[k].label for k, s in status.items() if s != "done"]
        if parent:
            _log_variants(parent, experiment, results, out, plan_)
            finish_run(parent, "FAILED" if failed or len(status) < len(plan_.nodes) else "FINISHED")
    if failed:
        raise GdrtError(f"{len(failed)} stage(s) failed or were skipped: {', '.join(failed[:6])}"
                        + (" ..." if len(failed) > 6 else ""), path=str(out / "logs"),
                        hint="fix the cause and run the same command again: finished stages are kept")
    return results


def cli(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise GdrtError(f"--jobs must be >= 1, got {args.jobs}", path="--jobs")
    from pipelines.local_run import check_out_given

    check_out_given(args.out)
    if not args.dry_run:
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    out = Path(args.out or Path("runs") / Path(args.sweep).stem)
    results = run(args.sweep, out, jobs=args.jobs, overrides=args.overrides, only=args.only or None,
                  dry_run=args.dry_run)
    if results:
        print((out / "results.md").read_text(encoding="utf-8"))
        print(f"results: {out / 'results.md'} and {out / 'results.json'}")


def _node_main(spec_path: str) -> int:
    """One stage of a sweep or a local run, in its own process: errors, Ctrl-C and the executor's SIGTERM end
    as one line on stderr naming the stage, and the command's exit code (`cli.report_errors`)."""
    from gdrt_core.cli import report_errors

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    return report_errors(f"{spec.get('command', 'gdrt sweep')}: {spec['label']}", lambda: run_spec(spec))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--node":
        sys.exit(_node_main(sys.argv[2]))
    sys.exit("usage: python -m pipelines.sweep --node SPEC.json (internal; use `gdrt sweep`)")
