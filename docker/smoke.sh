#!/usr/bin/env bash
# Smoke test of the images and the compose stack: build the CPU image, run the compose quickstart end to
# end, print the MLflow runs it produced, tear the stack down (KEEP=1 keeps it, with its volumes).
#
#   bash docker/smoke.sh
#
# Exit codes: 0 the quickstart finished; 1 a build or a stage failed (its logs are printed);
# 2 no Docker engine (or no compose) is available here, nothing was run.
# Environment: DOCKER (the docker CLI, default docker), GDRT_BUILD_ARGS (extra `docker build` arguments,
# e.g. "--build-arg OFFLINE=1"), GDRT_COMPOSE_OVERRIDE (an extra compose file, e.g. site images),
# GDRT_MLFLOW_PORT (host port of MLflow, default 5000), KEEP=1 (leave the stack running).
set -euo pipefail
cd "$(dirname "$0")"

project=${COMPOSE_PROJECT_NAME:-gdrt-smoke}
image=${GDRT_IMAGE:-gdrt/gdrt:0.1.0}
experiment=${GDRT_EXPERIMENT:-gdrt-compose}
export GDRT_IMAGE=$image GDRT_EXPERIMENT=$experiment

docker=${DOCKER:-docker}
if ! command -v "$docker" >/dev/null 2>&1 || ! "$docker" info >/dev/null 2>&1; then
  echo "smoke.sh: no Docker engine available here (docker info failed${DOCKER_HOST:+ for DOCKER_HOST=$DOCKER_HOST});" \
       "nothing was built or run. Start Docker (or point DOCKER_HOST at an engine) and run it again." >&2
  exit 2
fi
if "$docker" compose version >/dev/null 2>&1; then
  compose=("$docker" compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
else
  echo "smoke.sh: no Docker Compose (neither 'docker compose' nor 'docker-compose'); install the compose plugin." >&2
  exit 2
fi
files=(-f docker-compose.yml)
[ -n "${GDRT_COMPOSE_OVERRIDE:-}" ] && files+=(-f "$GDRT_COMPOSE_OVERRIDE")
dc() { "${compose[@]}" -p "$project" "${files[@]}" "$@"; }
read -r -a build_args <<< "${GDRT_BUILD_ARGS:-}"

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "smoke.sh: failed (exit $rc); logs of the stack:" >&2
    dc logs --no-color --tail 80 >&2 || true
  fi
  if [ "${KEEP:-0}" != 1 ]; then
    dc down -v --remove-orphans >/dev/null 2>&1 || true
  else
    echo "smoke.sh: stack kept (KEEP=1): MLflow on http://127.0.0.1:${GDRT_MLFLOW_PORT:-5000}; 'docker compose -p $project down -v' removes it"
  fi
}
trap cleanup EXIT

t0=$(date +%s)
echo "== building $image and ${GDRT_MLFLOW_IMAGE:-gdrt/mlflow:0.1.0} (docker/Dockerfile, BuildKit)"
export DOCKER_BUILDKIT=1
"$docker" build "${build_args[@]}" -f Dockerfile --target gdrt -t "$image" ..
"$docker" build "${build_args[@]}" -f Dockerfile --target mlflow -t "${GDRT_MLFLOW_IMAGE:-gdrt/mlflow:0.1.0}" ..

echo "== the compose quickstart (docker compose up): curate -> init-model -> train sft -> group -> train gdrt -> evaluate/attribute"
# up -d returns once every stage has been started, waiting on each depends_on condition; a failed stage
# makes it fail ("didn't complete successfully"). Then wait for the last stages to exit.
dc up -d --no-build
last=(evaluate-sft evaluate-gdrt attribute-sft attribute-gdrt)
for svc in "${last[@]}"; do
  cid=$(dc ps -q -a "$svc")
  [ -n "$cid" ] || { echo "smoke.sh: service $svc was never created" >&2; exit 1; }
  code=$("$docker" wait "$cid")
  [ "$code" = 0 ] || { echo "smoke.sh: $svc exited with $code" >&2; exit 1; }
done
for svc in curate init-model train-sft group train-gdrt "${last[@]}"; do
  code=$("$docker" inspect -f '{{.State.ExitCode}}' "$(dc ps -q -a "$svc")")
  [ "$code" = 0 ] || { echo "smoke.sh: $svc exited with $code" >&2; exit 1; }
done
echo "== finished in $(( $(date +%s) - t0 )) s; MLflow runs of experiment '$experiment':"

# The runs, read through the MLflow client inside the image (nothing needed on the host).
dc run --rm --no-deps -T -e GDRT_MLFLOW_PORT="${GDRT_MLFLOW_PORT:-5000}" --entrypoint python evaluate-gdrt - <<'EOF'
import os
from mlflow.tracking import MlflowClient

client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
exp = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
if exp is None:
    raise SystemExit("no MLflow experiment " + os.environ["MLFLOW_EXPERIMENT_NAME"])
runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
for r in runs:
    m = r.data.metrics
    keys = [k for k in ("ndcg_at_10", "hr_at_10", "mgu_at_10", "train_loss", "aux_share") if k in m]
    print(f"  {r.info.run_name:<16} {r.info.status:<9} {r.info.run_id}  " + "  ".join(f"{k} {m[k]:.4f}" for k in keys))
print(f"experiment {exp.experiment_id}: {len(runs)} runs; UI: http://127.0.0.1:{os.environ.get('GDRT_MLFLOW_PORT', '5000')}/#/experiments/{exp.experiment_id}")
if not runs or any(r.info.status != "FINISHED" for r in runs):
    raise SystemExit("not every run FINISHED")
EOF
