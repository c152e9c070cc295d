"""`gdrt run`: the whole pipeline on this machine, through kfp.local.SubprocessRunner(use_venv=False).

The same pipeline definition the cluster runs (pipelines/gdrt_pipeline.py, without the Kubernetes
settings). Parameters come from a YAML config (pipelines/configs/quickstart.yaml by default) and
`--set key=value` overrides. Artifacts go under --out (default runs/<timestamp>); MLflow logs to
MLFLOW_TRACKING_URI or the embedded sqlite store ./mlflow.db. One progress line per stage; the KFP log
is kept in <out>/pipeline.log.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import os
import re
import sys
import time
from pathlib import Path

from gdrt_core.errors import GdrtError

DEFAULT_CONFIG = Path("pipelines/configs/quickstart.yaml")
TABLE = (("NDCG@5", "ndcg@5"), ("NDCG@10", "ndcg@10"), ("HR@5", "hr@5"), ("HR@10", "hr@10"),
         ("MGU@5", "mgu@5"), ("DGU@5", "dgu@5"), ("aux share", "aux_share"))


def load_params(config: str | os.PathLike | None, overrides: list[str]) -> dict:
    """Pipeline parameters from the YAML file, then `key=value` overrides (YAML-typed values)."""
    import yaml

    from gdrt_core.config import parse_override, read_yaml, set_dotted

    params: dict = {}
    path = Path(config) if config else DEFAULT_CONFIG
    if config or path.is_file():
        params = read_yaml(path, "pipeline config")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(params, key, yaml.safe_load(value), where=f"--set {item}")
    return params


class _ProgressLog(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: everything goes to the log file, and each task's
    "finished with status" line becomes one progress line on stderr."""

    pattern = re.compile(r"Task \W*(?:\x1b\[\d+m)?'?([\w-]+)'?(?:\x1b\[0m)?'? finished with status (?:\x1b\[\d+m)?(\w+)")

    def __init__(self, log, names: dict[str, str], stream=sys.stderr):
        self.log, self.names, self.total, self.stream = log, names, len(names), stream
        self.done, self.t0 = 0, time.time()
        self.last, self.pending = self.t0, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.log.write(text)
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            m = self.pattern.search(line)
            if m:
                self.done += 1
                now = time.time()
                print(f"[{self.done:2d}/{self.total}] {self.names.get(m.group(1), m.group(1)):<24} {m.group(2):<8} {now - self.last:7.1f} s "
                      f"(total {now - self.t0:6.1f} s)", file=self.stream, flush=True)
                self.last = now
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def _display_names(pipeline) -> dict[str, str]:
    """KFP task name -> its display name (e.g. "train-2" -> "train GDRT")."""
    return {k: t.task_info.name or k for k, t in pipeline.pipeline_spec.root.dag.tasks.items()}


def run(params: dict, out: str | os.PathLike) -> dict:
    """Run the pipeline locally; returns the report's comparison (rows per model) and its directory."""
    from kfp import local

    from pipelines.gdrt_pipeline import build_pipeline

    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    # the local runner ignores display names and runs the project's image as this Python environment
    warnings.filterwarnings("ignore", module=r"kfp\.local\..*")
    pipeline = build_pipeline(cluster=False)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(out / "kfp"),
               raise_on_error=True)
    log_path = out / "pipeline.log"
    from gdrt_core.tracking import finish_run, start_pipeline_run

    parent = start_pipeline_run(params.get("experiment", "gdrt"), params.get("run_name", "gdrt"),
                                {k: v for k, v in params.items() if not isinstance(v, dict)})
    try:
        with open(log_path, "w", encoding="utf-8") as log, \
                contextlib.redirect_stdout(_ProgressLog(log, _display_names(pipeline))):
            result = pipeline(**{**params, "parent_run_id": parent})
    except Exception as e:  # a failed stage: show its error, not kfp's traceback
        finish_run(parent, "FAILED")
        raise GdrtError(f"the pipeline failed: {_last_error(log_path) or e}", path=str(log_path),
                        hint="the stage's full output is in this log") from None
    finish_run(parent, "FINISHED")
    report_dir = Path(result.output.path)
    comparison = json.loads((report_dir / "comparison.json").read_text(encoding="utf-8"))
    return {**comparison, "report_dir": str(report_dir)}


def _last_error(log_path: Path) -> str | None:
    """The last 'gdrt ... error' or exception line a stage printed."""
    try:
        lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        s = line.strip()
        if "GdrtError" in s or re.match(r"^[\w.]+(Error|Exception):", s):
            return s
    return None


def format_table(comparison: dict) -> str:
    rows = comparison["rows"]
    head = f"{'model':<8}" + "".join(f"{h:>11}" for h, _ in TABLE)
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{r[k]:>11.4f}" if isinstance(r.get(k), (int, float)) else f"{'—':>11}" for _, k in TABLE)
        lines.append(f"{r['model']:<8}{cells}")
    return "\n".join(lines)


def check_local_inputs(params: dict, source: str) -> None:
    """Before the first stage of a local run: the whole config (`stages.check_pipeline_params`), and the local
    paths it names (the source data, a base model given as a path) exist on this machine."""
    from gdrt_core.models import _looks_local
    from gdrt_core.stages import PIPELINE_DEFAULTS, base_model_settings, check_pipeline_params

    check_pipeline_params(params, source)
    data = str(params.get("source", PIPELINE_DEFAULTS["source"]))
    if not Path(data).expanduser().exists():
        raise GdrtError(f"the source data {data!r} does not exist (relative to {Path.cwd()})", path=source,
                        hint="set `source:` in the config or --set source=PATH")
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


def config_source(config: str | os.PathLike | None, overrides: list[str]) -> str:
    """How a pipeline config is named in error messages: its file, and the --set overrides if any."""
    path = str(config) if config else str(DEFAULT_CONFIG)
    return path + (f" with --set {' --set '.join(overrides)}" if overrides else "")


def cli(args: argparse.Namespace) -> None:
    params = load_params(args.config, args.overrides)
    check_local_inputs(params, config_source(args.config, args.overrides))
    out = Path(args.out or Path("runs") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    print(f"gdrt run: pipeline on {params.get('source', 'data/office')} -> {out} (KFP log: {out / 'pipeline.log'})",
          file=sys.stderr)
    t0 = time.time()
    comparison = run(params, out)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    print()
    print(format_table(comparison))
    print()
    print(f"finished in {time.time() - t0:.0f} s; artifacts under {out}")
    print(f"report: {Path(comparison['report_dir']) / 'report.html'}")
    if uri.startswith("sqlite:"):
        print(f"open the runs: mlflow ui --backend-store-uri {uri}")
    else:
        print(f"open the runs at {uri}")
