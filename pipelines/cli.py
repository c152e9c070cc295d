"""The `gdrt` console script: the library's stage commands (gdrt_core.cli) plus the orchestration commands
that live here, `gdrt run` (the whole pipeline on this machine) and `gdrt sweep` (variants of a config)."""

from __future__ import annotations

import argparse
import sys

from gdrt_core import cli as stage_cli
from gdrt_core.cli import Command, user_path


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", type=user_path, help="sweep file (YAML: config, experiment, set, variants)")
    p.add_argument("--out", type=user_path, default=None,
                   help="working directory (default: runs/<sweep file name>)")
    p.add_argument("--jobs", type=int, default=1, help="stages run at the same time (processes)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="pipeline parameter for every variant (after the sweep file's own `set`)")
    p.add_argument("--only", nargs="+", metavar="VARIANT", help="run these variants only")
    p.add_argument("--dry-run", action="store_true", help="print the stage graph and exit")


def _run_arguments(p: argparse.ArgumentParser) -> None:
    from pipelines.local_run import arguments

    arguments(p)


COMMANDS: dict[str, Command] = {
    "run": Command("run the whole pipeline locally with MLflow tracking", _run_arguments, "pipelines.local_run"),
    "sweep": Command("run variants of a pipeline config (seeds, ablations), shared stages once", _sweep_arguments,
                     "pipelines.sweep"),
}


def build_parser() -> argparse.ArgumentParser:
    return stage_cli.build_parser(COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return stage_cli.main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
