"""The Docker images and the compose stack, checked without a Docker engine.

- `docker-compose config` (Debian's docker-compose, installed by .ci/run) validates the compose file;
- every gdrt service's command parses with the CLI's own parser and its settings load into the stage's
  typed config (so a renamed flag or setting breaks here, not in a container);
- volumes and depends_on follow the artifact flow: a stage reads only directories written by services it
  depends on, on the same volume;
- the stack is the pipeline graph (pipelines/graph.py) up to the attributions: each service is one step,
  reading the artifacts of the steps the graph says, under the graph's MLflow run name, and no service
  sets a parameter the graph gives only to another step of its stage (SFT gets no tau);
- both Dockerfiles pin the versions of pyproject.toml.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from gdrt_core.cli import build_parser
from gdrt_core.config import load_config
from gdrt_core.stages import STAGES, STEP_ARGUMENTS, step_values
from pipelines import graph
from pipelines.params import PIPELINE_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
DOCKERFILES = (DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda")

# stage command -> (module, config class) whose typed config the service's flags and --set must load into
STAGE_CONFIGS = {name: (stage.module, stage.config) for name, stage in STAGES.items()}
# flags whose value is an artifact directory the stage reads, and the one it writes
INPUT_FLAGS = ("dataset", "model", "reference", "groups")
VOLUME_ROOT = "/artifacts"
ARTIFACT_KINDS = {
    "curate": "dataset",
    "init-model": "model",
    "train": "model",
    "group": "groups",
    "evaluate": "eval",
    "attribute": "attribution",
}

_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose's `${VAR}` / `${VAR:-default}` interpolation (defaults only unless `env` is given)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return interpolate(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def gdrt_services(compose: dict) -> dict[str, dict]:
    """Services that run the gdrt image (its ENTRYPOINT is `gdrt`, so `command` is gdrt's argv)."""
    out = {}
    for name, svc in compose["services"].items():
        build = svc.get("build") or {}
        if build.get("dockerfile") == "docker/Dockerfile.cuda" or build.get("target") == "gdrt":
            out[name] = svc
    return out


def argv(svc: dict) -> list[str]:
    cmd = svc["command"]
    return [str(a) for a in cmd] if isinstance(cmd, list) else shlex.split(cmd)


def depends(svc: dict) -> dict[str, str]:
    deps = svc.get("depends_on") or {}
    return (
        {d: "service_started" for d in deps}
        if isinstance(deps, list)
        else {k: v["condition"] for k, v in deps.items()}
    )


def closure(compose: dict, name: str) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        for dep in depends(compose["services"][todo.pop()]):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def mounts(svc: dict) -> dict[str, str]:
    """container path -> volume name (or host path) of the service's volumes."""
    out = {}
    for v in svc.get("volumes", []):
        source, target, *_ = v.split(":")
        out[target] = source
    return out


def profiles(svc: dict) -> tuple[str, ...]:
    return tuple(svc.get("profiles", ()))


# ------------------------------------------------------------------------------------ docker-compose config


def _compose_commands() -> list[list[str]]:
    cmds = []
    if shutil.which("docker-compose"):
        cmds.append(["docker-compose"])
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0
    ):
        cmds.append(["docker", "compose"])
    return cmds


@pytest.mark.parametrize("profile", [None, "gpu"])
def test_compose_config_validates(profile):
    """The compose binary itself accepts the file, with and without the gpu profile."""
    cmds = _compose_commands()
    if not cmds:
        pytest.skip("no docker-compose binary (.ci/run installs Debian's docker-compose)")
    for cmd in cmds:
        args = [*cmd, "-f", str(COMPOSE)] + (["--profile", profile] if profile else []) + ["config", "-q"]
        res = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=DOCKER)
        assert res.returncode == 0, f"{' '.join(args)}:\n{res.stderr}"


# ------------------------------------------------------------------------------------------- the commands


def test_every_stage_command_parses_and_loads_its_config(compose):
    """argv -> gdrt's parser -> the stage's typed config: flags and --set keys/values all exist and type-check."""
    services = gdrt_services(compose)
    assert services, "no gdrt services found"
    parser = build_parser()
    for name, svc in services.items():
        args = parser.parse_args(argv(svc))
        assert args.command in STAGE_CONFIGS, f"{name}: {args.command} is not a stage the compose stack runs"
        module, cls_name = STAGE_CONFIGS[args.command]
        cls = getattr(importlib.import_module(module), cls_name)
        fields = {f.name for f in dataclasses.fields(cls)}
        flags = {k: v for k, v in vars(args).items() if k in fields and k not in ("config", "overrides")}
        cfg = load_config(cls, args.config, args.overrides, **flags)
        if args.command == "train":
            from gdrt_core.train import validate

            validate(cfg)


def test_default_services_run_the_whole_quickstart(compose):
    """`docker compose up` with no arguments (services without a profile) runs every stage of the flow."""
    parsed = [build_parser().parse_args(argv(s)) for s in gdrt_services(compose).values() if not profiles(s)]
    stages = {(a.command, getattr(a, "objective", None)) for a in parsed}
    assert stages == {
        ("curate", None),
        ("init-model", None),
        ("train", "sft"),
        ("group", None),
        ("train", "gdrt"),
        ("evaluate", None),
        ("attribute", None),
    }
    for command in ("evaluate", "attribute"):
        models = sorted(a.model for a in parsed if a.command == command)
        assert models == ["/artifacts/gdrt", "/artifacts/sft"], f"{command}: both models, got {models}"


def test_tracking_points_at_the_mlflow_service(compose):
    for name, svc in gdrt_services(compose).items():
        assert svc["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000", name
        assert depends(svc).get("mlflow", "service_healthy") == "service_healthy", name
        assert "mlflow" in closure(compose, name), f"{name} starts before the MLflow server is healthy"


# ----------------------------------------------------------------------------------------- artifact flow


def test_volumes_and_dependencies_follow_the_artifact_flow(compose):
    """Every input directory is the --out of a service in the reader's depends_on closure (upstream stages
    all with condition service_completed_successfully), and both mount the same volume at /artifacts."""
    services = gdrt_services(compose)
    writers: dict[tuple[str, tuple[str, ...]], str] = {}
    outputs = {}
    for name, svc in services.items():
        args = build_parser().parse_args(argv(svc))
        assert args.out.startswith(VOLUME_ROOT + "/"), f"{name} writes {args.out}, outside the shared volume"
        assert mounts(svc).get(VOLUME_ROOT) == "artifacts", f"{name} does not mount the artifacts volume"
        key = (args.out, profiles(svc))
        assert key not in writers, f"{name} and {writers[key]} both write {args.out}"
        writers[key] = name
        outputs[name] = args.out

    for name, svc in services.items():
        args = build_parser().parse_args(argv(svc))
        upstream = closure(compose, name)
        for cond_dep, cond in depends(svc).items():
            if cond_dep in services:
                assert cond == "service_completed_successfully", f"{name} -> {cond_dep}: {cond}"
        for flag in INPUT_FLAGS:
            path = getattr(args, flag, None)
            if not path or not path.startswith(VOLUME_ROOT + "/"):
                continue  # a hub id or the image's bundled data
            producers = [w for w in upstream if outputs.get(w) == path]
            assert producers, (
                f"{name} reads {path} (--{flag}) but none of its dependencies {sorted(upstream)} writes it"
            )
            for p in producers:
                assert mounts(services[p])[VOLUME_ROOT] == mounts(svc)[VOLUME_ROOT]


def test_gpu_variants_reserve_gpus_and_mirror_the_cpu_training(compose):
    services = gdrt_services(compose)
    gpu = {n: s for n, s in services.items() if "gpu" in profiles(s)}
    assert set(gpu) == {"train-sft-gpu", "train-gdrt-gpu"}
    for name, svc in gpu.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices), name
        assert svc["build"]["dockerfile"] == "docker/Dockerfile.cuda"
        assert svc.get("shm_size"), f"{name}: DeepSpeed/NCCL need a large /dev/shm"
        cpu = services[name.removesuffix("-gpu")]
        assert cpu.get("shm_size")
        gpu_args, cpu_args = (build_parser().parse_args(argv(s)) for s in (svc, cpu))
        for flag in ("dataset", "model", "objective", "groups", "out"):
            assert getattr(gpu_args, flag) == getattr(cpu_args, flag), f"{name} --{flag}"
        assert set(cpu_args.overrides) <= set(gpu_args.overrides), f"{name}: other settings than {cpu}"
        assert not any("gpu" in profiles(services[d]) for d in depends(cpu) if d in services)


def test_mlflow_and_postgres(compose):
    s = compose["services"]
    assert s["mlflow"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pg_isready" in " ".join(s["postgres"]["healthcheck"]["test"])
    assert "/health" in " ".join(s["mlflow"]["healthcheck"]["test"])
    cmd = " ".join(s["mlflow"]["command"])
    assert "--backend-store-uri=postgresql://" in cmd and "@postgres:5432/" in cmd
    assert (
        "--artifacts-destination=/mlartifacts" in cmd and mounts(s["mlflow"])["/mlartifacts"] == "mlartifacts"
    )
    for name, svc in s.items():  # published on the loopback interface only
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond 127.0.0.1"
    assert "ports" not in s["postgres"]
    assert s["mlflow"]["build"]["target"] == "mlflow"


def test_images_built_from_the_checkout_are_not_pulled(compose):
    """gdrt/gdrt and gdrt/mlflow are names anyone could publish: by default compose builds them here."""
    for name, svc in compose["services"].items():
        if "build" in svc:
            assert svc.get("pull_policy") == "build", f"{name} would try a registry before building"


def _paths_after(command: str, text: str) -> set[str]:
    """Absolute paths named by every `command ...` in the Dockerfile (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    return {
        w
        for m in re.finditer(rf"{command}\s+([^&;\n]*)", joined)
        for w in m.group(1).split()
        if w.startswith("/")
    }


def test_named_volume_mount_points_belong_to_the_image_user(compose):
    """A new named volume copies the owner of its mount point from the image: every one the non-root
    stages write to must exist in the image, owned by gdrt (else hub downloads or outputs fail)."""
    for name, svc in compose["services"].items():
        if not svc.get("build"):
            continue
        text = (REPO / svc["build"]["dockerfile"]).read_text(encoding="utf-8")
        created, owned = _paths_after("mkdir -p", text), _paths_after("chown (?:-R )?gdrt:gdrt", text)
        for target, source in mounts(svc).items():
            if source.startswith((".", "/", "$")):
                continue  # a bind mount from the host
            assert target in created, f"{name}: {target} is not created in {svc['build']['dockerfile']}"
            assert any(target == p or target.startswith(p + "/") for p in owned), (
                f"{name}: {target} not owned by gdrt"
            )


# -------------------------------------------------------------------------------------------- Dockerfiles


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^;\s]+)", dep.strip())
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def dockerfile_args(text: str) -> dict[str, str]:
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(\S*)", text, re.M)}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_equal_pyproject(dockerfile):
    """torch and DeepSpeed are installed on their own (build variant, ops) and must carry pyproject's pins;
    the project is installed with its dependencies, which brings every other pin; no other `==` disagrees."""
    text = dockerfile.read_text(encoding="utf-8")
    pins = pyproject_pins()
    assert {"torch", "deepspeed", "transformers", "mlflow"} <= set(pins), pins
    args = dockerfile_args(text)
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["DEEPSPEED_VERSION"] == pins["deepspeed"]
    assert '"torch==${TORCH_VERSION}"' in text and '"deepspeed==${DEEPSPEED_VERSION}"' in text
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"';]*)", text):
        if name.lower() in pins:
            assert version == pins[name.lower()], (
                f"{dockerfile.name}: {name}=={version}, pyproject {pins[name.lower()]}"
            )
    for arg, value in args.items():
        m = re.fullmatch(r"(\w+)_VERSION", arg)
        name = m and m.group(1).lower().replace("_", "-")
        if name in pins:
            assert value == pins[name], f"{dockerfile.name}: ARG {arg}={value}, pyproject {pins[name]}"
    install = re.search(r"pip install [^\n]*/src\b", text)
    assert install and "--no-deps" not in install.group(0), (
        "the project must be installed with its pinned deps"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_shape(dockerfile):
    """Multi-stage, non-root, ENTRYPOINT gdrt, no HEALTHCHECK, build args for the bases and the package
    sources, the bundled data where the relative default `source: data/office` resolves, no secrets."""
    text = dockerfile.read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    body = "\n".join(lines)
    assert len(re.findall(r"^FROM ", body, re.M)) >= 2
    assert "HEALTHCHECK" not in body
    args = dockerfile_args(body)
    for arg in ("BUILDER_IMAGE", "RUNTIME_IMAGE", "INDEX_URL", "TORCH_INDEX_URL", "OFFLINE", "WHEELHOUSE"):
        assert arg in args, f"{dockerfile.name}: no build argument {arg}"
    if dockerfile.name.endswith(".cuda"):
        assert args["TORCH_CUDA_ARCH_LIST"] and "TORCH_CUDA_ARCH_LIST=" in body and "DS_BUILD_" in body

    # the stage that ENTRYPOINT ["gdrt"] belongs to, followed back to its root through FROM <stage>
    stages, current = {}, None
    for ln in lines:
        m = re.match(r"FROM (\S+)(?: AS (\S+))?", ln)
        if m:
            current = m.group(2) or f"stage{len(stages)}"
            stages[current] = {"from": m.group(1), "lines": []}
        elif current:
            stages[current]["lines"].append(ln)
    final = list(stages)[-1]
    assert 'ENTRYPOINT ["gdrt"]' in stages[final]["lines"], "the default (last) target runs gdrt"
    chain, name = [], final
    while name in stages:
        chain.insert(0, name)
        name = stages[name]["from"]
    final_lines = [ln.strip() for n in chain for ln in stages[n]["lines"]]
    users = [ln.split()[1] for ln in final_lines if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    assert not any(
        ln.startswith(("RUN apt-get", "RUN pip"))
        for ln in final_lines[final_lines.index(f"USER {users[-1]}") :]
    )
    workdir = [ln.split()[1] for ln in final_lines if ln.startswith("WORKDIR ")][-1]
    assert "COPY data ./data" in final_lines and "COPY pipelines/configs ./pipelines/configs" in final_lines
    assert workdir.startswith("/")
    assert any("COPY --from=builder /opt/venv /opt/venv" in ln for ln in final_lines)
    assert not re.search(r"^(ARG|ENV)\s+\S*(PASSWORD|TOKEN|SECRET)", body, re.M | re.I)

    ignore_file = DOCKER / f"{dockerfile.name}.dockerignore"
    ignore = [
        ln.strip()
        for ln in ignore_file.read_text(encoding="utf-8").splitlines()
        if ln.strip()[:1] not in ("", "#")
    ]
    assert ignore[0] == "*", "the build context lets in only what the image needs (not .venv, runs, ...)"
    for needed in (
        "pyproject.toml",
        "README.md",
        "gdrt_core",
        "components",
        "pipelines",
        "data",
        "docker/wheelhouse",
    ):
        assert f"!{needed}" in ignore, f"{ignore_file.name} leaves out {needed}"


def test_bundled_default_source_resolves_from_the_workdir(compose):
    """Relative defaults (compose's `data/office`, the quickstart's `source`) name the copies in WORKDIR."""
    quick = yaml.safe_load((REPO / "pipelines/configs/quickstart.yaml").read_text(encoding="utf-8"))
    args = build_parser().parse_args(argv(compose["services"]["curate"]))
    for source in (quick["source"], args.source):
        assert not os.path.isabs(source) and (REPO / source).is_dir() and source.split("/")[0] == "data"


# ------------------------------------------------------------------------------------------------- smoke


def test_smoke_script_explains_a_missing_engine(tmp_path):
    """Without a reachable Docker engine the smoke script stops at once with a message that says so."""
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    res = subprocess.run(
        ["bash", str(DOCKER / "smoke.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 2, res.stdout + res.stderr
    assert "no Docker engine" in res.stderr


# ------------------------------------------------------------------------------ the quickstart, no Docker


def topological(compose: dict, names: list[str]) -> list[str]:
    order: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        for dep in depends(compose["services"][n]):
            if dep in names:
                visit(dep)
        order.append(n)

    for n in sorted(names):
        visit(n)
    return order


@pytest.mark.slow
def test_compose_quickstart_runs_without_docker(compose, tmp_path):
    """What `docker compose up` runs, stage by stage in dependency order, here: /artifacts is a temporary
    directory, the working directory is the repository (the image's WORKDIR holds the same data/ and
    pipelines/configs), MLflow is a sqlite store. Every stage exits 0 and writes its artifact."""
    from gdrt_core.artifacts import read_manifest

    services = {n: s for n, s in gdrt_services(compose).items() if not profiles(s)}
    gdrt = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "gdrt"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "HF_HUB_OFFLINE": "1"}
    for name in topological(compose, list(services)):
        svc = services[name]
        args = [a.replace(VOLUME_ROOT, str(tmp_path / "artifacts")) for a in argv(svc)]
        run_env = {**env, **{k: str(v) for k, v in svc["environment"].items() if k != "MLFLOW_TRACKING_URI"}}
        res = subprocess.run(
            [str(gdrt), *args], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=900
        )
        assert res.returncode == 0, f"{name}: {' '.join(args)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        parsed = build_parser().parse_args(args)
        read_manifest(parsed.out, ARTIFACT_KINDS[parsed.command])


# ----------------------------------------------------------------------------------------- the graph

# steps of the graph the compose stack leaves out: the report, GDRT's valid evaluation and the registry
# need the pipeline's parent run (docs/operations.md: `gdrt run` or KFP for those)
NOT_IN_COMPOSE = {"report", "valid_gdrt", "register"}


def test_the_stack_is_the_pipeline_graph(compose):
    """Each default service runs one step of pipelines/graph.py: the same stage, its inputs the outputs of
    the services of the graph's input steps (and among its dependencies), the graph's run name; and no
    service sets a parameter the graph gives only to another step of its stage."""
    services = {n: build_parser().parse_args(argv(s)) for n, s in gdrt_services(compose).items()
                if not profiles(s)}
    service_of: dict[str, str] = {}
    for step in graph.steps():
        if step.name in NOT_IN_COMPOSE:
            continue
        renames = STEP_ARGUMENTS.get(step.stage, {})
        reads = {renames.get(arg, arg): services[service_of[src]].out for arg, src in step.inputs.items()}
        matches = [name for name, args in services.items() if args.command == step.stage and reads == {
            flag: getattr(args, flag) for flag in INPUT_FLAGS
            if str(getattr(args, flag, None) or "").startswith(VOLUME_ROOT + "/")}]
        assert len(matches) == 1, f"step {step.name}: services {matches}"
        name = service_of[step.name] = matches[0]
        args = services[name]
        if step.tracked:  # (the base model step logs no run)
            assert args.run_name == (step.run_name or step.stage), f"{name}: run name {args.run_name!r}"
        upstream = closure(compose, name)
        assert {service_of[src] for src in step.inputs.values()} <= upstream, name
        others = {f for s in graph.steps() if s.stage == step.stage and s.name != step.name
                  for f in step_values(s.stage, graph.step_args(s, PIPELINE_DEFAULTS))}
        own = set(step_values(step.stage, graph.step_args(step, PIPELINE_DEFAULTS)))
        given = {k for k, v in vars(args).items() if v is not None} | {o.split("=", 1)[0] for o in args.overrides}
        assert not (others - own) & given, f"{name} sets {(others - own) & given}, parameters of another step"
    assert set(service_of.values()) == set(services), "a service that is no step of the graph"
