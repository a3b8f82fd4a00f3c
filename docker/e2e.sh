#!/usr/bin/env bash
# End-to-end proof that the images build and the pipeline runs in containers
# on one machine with no registry access (make docker-e2e). Not run in CI:
# it needs root, dockerd and ~15 GB of disk, and takes a while on 2 cores.
#
#   1. start dockerd if no daemon answers (installs docker.io when missing)
#   2. make a Debian bookworm base with debootstrap (docker/make_local_base.sh)
#   3. build dcml-base + the stage images on it with faiss-cpu
#      (docker/build.sh), torch & co. from this machine's wheel mirrors
#   4. smoke checks: imports in the base, `dcml <stage> --help` in every stage
#      image, and ingest -> extract -> cluster chained through the stage CLIs
#      in their own images on the real Fashion-MNIST files
#   5. the whole pipeline through kfp.local.DockerRunner:
#      `dcml run --runner docker`, then the same run again, which must be
#      served from the cache (only the never-cached MLflow step runs)
#
# Env knobs: REGISTRY (default dcml), TAG (default the short git commit,
# "-dirty" appended when the package has uncommitted changes), BASE_IMAGE
# (skip debootstrap), SKIP_BUILD=1 (reuse built images), FAISS_PACKAGE
# (default faiss-cpu==1.15.1), LOCAL_PIP_MIRRORS (default: the file://
# indexes of this machine's pip config), E2E_DIR (default /tmp/dcml-docker-e2e),
# E2E_CONFIG (default demo), E2E_SET (extra "--set k=v ..." for dcml run),
# DCML (the dcml executable that drives the run; default .venv/bin/dcml).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
E2E_DIR=${E2E_DIR:-/tmp/dcml-docker-e2e}
REGISTRY=${REGISTRY:-dcml}
DCML=${DCML:-$ROOT/.venv/bin/dcml}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
FASHION_MNIST=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
STAGES="ingest extract cluster train finetune evaluate compress"
mkdir -p "$E2E_DIR"

if [ -z "${TAG:-}" ]; then
  TAG=$(git rev-parse --short=12 HEAD 2>/dev/null || echo dev)
  package_paths=(dcml components data_prep pipeline.py pyproject.toml docker)
  if [ -n "$(git status --porcelain -- "${package_paths[@]}" 2>/dev/null)" ]; then
    # Uncommitted code: a tag that changes with it, so the local pipeline
    # cache (keyed on the image names) never serves results of older code.
    dirty=$({ git diff HEAD -- "${package_paths[@]}"
              git ls-files --others --exclude-standard -z -- "${package_paths[@]}" | xargs -0 -r cat
            } | sha256sum | cut -c1-8)
    TAG="$TAG-dirty-$dirty"
  fi
fi

results=()
log() { echo "[e2e] $*" >&2; }
record() { results+=("$(printf '%-48s %-4s %6s s' "$1" "$2" "$3")"); }
finish() {
  local code=$?
  log "summary (logs in $E2E_DIR):"
  printf '  %s\n' "${results[@]}" >&2
  if [ "$code" = 0 ]; then log "PASSED"; else log "FAILED (exit $code)"; fi
}
trap finish EXIT
step() {  # name command...: run, time, record PASS/FAIL, stop on failure
  local name=$1; shift
  local start=$SECONDS
  log "--- $name"
  if "$@"; then
    record "$name" PASS $((SECONDS - start))
  else
    record "$name" FAIL $((SECONDS - start))
    return 1
  fi
}

# ------------------------------------------------------------------ 1. docker
ensure_docker() {
  if docker info >/dev/null 2>&1; then return 0; fi
  if ! command -v dockerd >/dev/null; then
    [ "$(id -u)" = 0 ] || { log "no dockerd; install docker.io as root"; return 1; }
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >"$E2E_DIR/apt.log" 2>&1
  fi
  log "starting dockerd (log $E2E_DIR/dockerd.log); it keeps running afterwards"
  nohup dockerd >"$E2E_DIR/dockerd.log" 2>&1 &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && return 0
    sleep 1
  done
  tail -20 "$E2E_DIR/dockerd.log" >&2
  return 1
}
step "dockerd" ensure_docker

# ------------------------------------------------------------ 2-3. the images
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  if [ -z "${BASE_IMAGE:-}" ]; then
    step "local base (debootstrap + docker import)" bash -c \
      "bash docker/make_local_base.sh > '$E2E_DIR/local_base.txt'"
    BASE_IMAGE=$(tail -1 "$E2E_DIR/local_base.txt")
  fi
  if [ -z "${LOCAL_PIP_MIRRORS+set}" ]; then
    # This machine's pip reads local wheel mirrors (file:///.../simple):
    # serve the same ones to the build so torch's ~3 GB come from disk.
    LOCAL_PIP_MIRRORS=$("$PYTHON" -m pip config get global.extra-index-url 2>/dev/null \
      | tr ' ' '\n' | sed -n 's|^file://\(.*\)/simple/\{0,1\}$|\1|p' | tr '\n' ' ' || true)
  fi
  log "base $BASE_IMAGE; local pip mirrors: ${LOCAL_PIP_MIRRORS:-none}"
  step "build $REGISTRY/dcml-{base,<stage>}:$TAG" env BASE_IMAGE="$BASE_IMAGE" \
    FAISS_PACKAGE="${FAISS_PACKAGE:-faiss-cpu==1.15.1}" LOCAL_PIP_MIRRORS="$LOCAL_PIP_MIRRORS" \
    BUILD_LOG_DIR="$E2E_DIR/build" bash docker/build.sh "$REGISTRY" "$TAG"
fi
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -F ":$TAG" | sort >"$E2E_DIR/images.txt" || true
cat "$E2E_DIR/images.txt" >&2

# ----------------------------------------------------------- 4. smoke checks
img() { echo "$REGISTRY/dcml-$1:$TAG"; }
as_me=(--user "$(id -u):$(id -g)")

step "imports in dcml-base" docker run --rm "$(img base)" python -c '
import os, faiss, kfp, torch, torchvision, dcml, components, pipeline
from dcml_app.cli import COMMANDS
print("torch", torch.__version__, "torchvision", torchvision.__version__, "faiss", faiss.__version__,
      "kfp", kfp.__version__, "cuda", torch.cuda.is_available(), "commit", os.environ["DCML_GIT_COMMIT"])
assert os.environ["DCML_GIT_COMMIT"] not in ("", "unknown")
'
# shellcheck disable=SC2016  # expanded inside the container
step "non-root user in dcml-base" docker run --rm "$(img base)" sh -c 'test "$(id -u)" != 0 && touch "$HOME/x" /minio/x'
for stage in $STAGES; do
  step "dcml $stage --help in dcml-$stage" bash -c "docker run --rm '$(img "$stage")' >'$E2E_DIR/help-$stage.txt'"
done

work="$E2E_DIR/stages"
rm -rf "$work"; mkdir -p "$work"
in_stage() {  # stage args...: the stage's CLI in its image, as this user
  local stage=$1; shift
  docker run --rm "${as_me[@]}" -v "$FASHION_MNIST:/data/fashion-mnist:ro" -v "$work:/work" \
    -w /work "$(img "$stage")" dcml "$stage" "$@"
}
if [ -d "$FASHION_MNIST" ]; then
  step "ingest in dcml-ingest (Fashion-MNIST)" in_stage ingest --dataset fashion-mnist \
    --root /data/fashion-mnist --out /work/manifest.parquet --split-mode class-disjoint --max-per-class 40
  step "extract in dcml-extract" in_stage extract --manifest /work/manifest.parquet \
    --out /work/features.parquet --backbone small_cnn --weights none --image-size 28 --batch-size 128
  step "cluster in dcml-cluster" in_stage cluster --features /work/features.parquet \
    --out /work/clusters.parquet --k 2
  step "stage outputs readable on the host" "$PYTHON" - "$work" <<'EOF'
import sys
from pathlib import Path
import pyarrow.parquet as pq
work = Path(sys.argv[1])
for name in ("manifest", "features", "clusters"):
    table = pq.read_table(work / f"{name}.parquet")
    print(f"{name}: {table.num_rows} rows, columns {table.column_names}")
    assert table.num_rows > 0
EOF
else
  log "no Fashion-MNIST at $FASHION_MNIST (apt-get install dataset-fashion-mnist): CLI stage checks skipped"
fi

# --------------------------------------------- 5. the pipeline in containers
run_dir="$E2E_DIR/pipeline"
export DCML_MLFLOW_DIR="$run_dir/mlflow"
unset MLFLOW_TRACKING_URI
run_args=(run --runner docker --image-registry "$REGISTRY" --image-tag "$TAG" --config "${E2E_CONFIG:-demo}"
          --output-dir "$run_dir/runs")
# shellcheck disable=SC2206
run_args+=(${E2E_SET:-})
rm -rf "$run_dir"; mkdir -p "$run_dir"
# A fresh output folder makes the first run execute every task; it must run
# with caching on (kfp.local neither reads nor writes its cache with
# --no-cache), so the identical second run is served from that cache.
step "dcml run --runner docker" bash -c "'$DCML' ${run_args[*]} --json-out '$run_dir/first.json' 2>&1 | tee '$run_dir/first.log'; exit \${PIPESTATUS[0]}"
step "same run again, served from the cache" bash -c "'$DCML' ${run_args[*]} --json-out '$run_dir/second.json' 2>&1 | tee '$run_dir/second.log'; exit \${PIPESTATUS[0]}"
step "runs agree; second one cached" "$PYTHON" - "$run_dir" <<'EOF'
import json, re, sys
from pathlib import Path
run_dir = Path(sys.argv[1])
first, second = (json.loads((run_dir / f"{n}.json").read_text()) for n in ("first", "second"))
logs = {n: re.sub(r"\x1b\[[0-9;]*m", "", (run_dir / f"{n}.log").read_text()) for n in ("first", "second")}
executed = {n: re.findall(r"Executing task '([^']+)'", log) for n, log in logs.items()}
print("metrics:", {k: round(v, 4) for k, v in first["metrics"].items()})
print(f"first run {first['seconds']} s ({len(executed['first'])} tasks in containers: {', '.join(executed['first'])})")
print(f"second run {second['seconds']} s (executed: {', '.join(executed['second']) or 'none'})")
assert "Found image" in logs["first"], "stages must run in the local images"
assert first["metrics"] == second["metrics"], "the cached run must return the same metrics"
assert set(executed["second"]) <= {"track"}, "only the (never cached) MLflow step may run again"
EOF
