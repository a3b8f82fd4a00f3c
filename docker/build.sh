#!/usr/bin/env bash
# Build the dcml images: REGISTRY/dcml-base:TAG, then REGISTRY/dcml-<stage>:TAG
# for every stage, FROM that base. Never tags :latest.
#
#   bash docker/build.sh REGISTRY TAG          (make images REGISTRY=... TAG=...)
#
# Env knobs:
#   BASE_IMAGE         base of dcml-base (default: the Dockerfile's CUDA runtime
#                      image); e.g. the image docker/make_local_base.sh prints
#   FAISS_PACKAGE      pip requirement for faiss (default faiss-gpu-cu12==...;
#                      faiss-cpu==1.15.1 for CPU-only images)
#   STAGES             which stage images (default: all seven)
#   SKIP_BASE=1        reuse an existing REGISTRY/dcml-base:TAG
#   BUILD_CA_BUNDLE    CA bundle file pip trusts during the build (TLS proxy);
#                      default: $PIP_CERT when it names a file
#   LOCAL_PIP_MIRRORS  space-separated folders each holding a PEP 503 simple/
#                      index (wheel mirror on this machine): served on
#                      127.0.0.1 for the build and added as extra indexes, so
#                      torch & co. come from disk; implies BUILD_NETWORK=host
#   MIRROR_PORT        first loopback port for those mirrors (default 38400)
#   PIP_INDEX_URL, PIP_EXTRA_INDEX_URL, PIP_TRUSTED_HOST  passed to pip
#   BUILD_NETWORK      docker build --network (e.g. host)
#   DCML_GIT_COMMIT    recorded in the images (default: the 12-digit commit)
#   BUILD_LOG_DIR      build logs (default /tmp/dcml-docker-build)
set -euo pipefail

REGISTRY=${1:?usage: build.sh REGISTRY TAG}
TAG=${2:?usage: build.sh REGISTRY TAG}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ALL_STAGES="ingest extract cluster train finetune evaluate compress"
STAGES=${STAGES:-$ALL_STAGES}
LOG_DIR=${BUILD_LOG_DIR:-/tmp/dcml-docker-build}
mkdir -p "$LOG_DIR"

log() { echo "[build] $*" >&2; }
die() { log "error: $*"; exit 1; }

case "$TAG" in
  latest|"") die "refusing tag '$TAG': images are pinned to a unique tag (the git commit)";;
esac
[[ "$TAG" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "invalid docker tag '$TAG'"
for stage in $STAGES; do
  [ -f "$ROOT/docker/$stage/Dockerfile" ] || die "no docker/$stage/Dockerfile (stages: $ALL_STAGES)"
done
docker info >/dev/null 2>&1 || die "docker daemon not reachable (start dockerd)"
# The docker CLI without the buildx plugin cannot use BuildKit: use the
# classic builder (the Dockerfiles work with both).
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi

image() { echo "$REGISTRY/dcml-$1:$TAG"; }
# The short form dcml.contracts.records.git_commit() reports outside images, so stage
# records agree wherever they ran; the OCI label gets the full hash.
COMMIT=${DCML_GIT_COMMIT:-$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}
REVISION=$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo "$COMMIT")
if [ -n "$(git -C "$ROOT" status --porcelain -- dcml components data_prep pipeline.py pyproject.toml 2>/dev/null)" ]; then
  log "warning: uncommitted changes in the package; images record commit $COMMIT"
fi

workdir=$(mktemp -d /tmp/dcml-build.XXXXXX)
server_pids=()
cleanup() {
  for pid in "${server_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$workdir"
}
trap cleanup EXIT

build_args=(--build-arg "DCML_GIT_COMMIT=$COMMIT" --build-arg "DCML_GIT_REVISION=$REVISION" --build-arg "DCML_IMAGE_TAG=$TAG")
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
[ -n "${FAISS_PACKAGE:-}" ] && build_args+=(--build-arg "FAISS_PACKAGE=$FAISS_PACKAGE")
network=${BUILD_NETWORK:-}

free_port() {  # the wanted port when free, else a random one (cache miss)
  python3 -c '
import socket, sys
for port in (int(sys.argv[1]), 0):
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
            print(s.getsockname()[1])
            break
    except OSError:
        print(f"[build] port {port} busy: a random port invalidates the layer cache", file=sys.stderr)
' "$1"
}
extra_index=${PIP_EXTRA_INDEX_URL:-}
MIRROR_PORT=${MIRROR_PORT:-38400}
if [ -n "${LOCAL_PIP_MIRRORS:-}" ]; then
  for mirror in $LOCAL_PIP_MIRRORS; do
    [ -d "$mirror/simple" ] || die "LOCAL_PIP_MIRRORS: $mirror has no simple/ index"
    # A fixed port keeps PIP_EXTRA_INDEX_URL, and so the layer cache, stable.
    port=$(free_port $((MIRROR_PORT + ${#server_pids[@]})))
    name=$(basename "$mirror")
    python3 -m http.server "$port" --bind 127.0.0.1 --directory "$mirror" >"$LOG_DIR/mirror-$name.log" 2>&1 &
    server_pids+=($!)
    extra_index="$extra_index http://127.0.0.1:$port/simple"
    log "serving $mirror on 127.0.0.1:$port (log $LOG_DIR/mirror-$name.log)"
  done
  network=host  # the build containers reach the host's loopback only this way
  sleep 1
fi
extra_index=${extra_index# }
[ -n "${PIP_INDEX_URL:-}" ] && build_args+=(--build-arg "PIP_INDEX_URL=$PIP_INDEX_URL")
[ -n "$extra_index" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$extra_index")
[ -n "${PIP_TRUSTED_HOST:-}" ] && build_args+=(--build-arg "PIP_TRUSTED_HOST=$PIP_TRUSTED_HOST")
network_args=()
[ -n "$network" ] && network_args=(--network "$network")

# Send only what the package needs (no .venv, runs, mlflow, bench results,
# tests): a tar on stdin is the build context, whatever .dockerignore says.
make_context() {
  local tarball="$workdir/context.tar" members=(pyproject.toml README.md LICENSE dcml components data_prep docker)
  [ -f "$ROOT/pipeline.py" ] && members+=(pipeline.py)
  tar -C "$ROOT" -cf "$tarball" --exclude='__pycache__' --exclude='*.pyc' --exclude='*/tests' \
    --exclude='*.egg-info' --exclude='docker/ca/extra-ca.crt' "${members[@]}"
  local ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-}}
  if [ -n "$ca" ]; then
    [ -f "$ca" ] || die "BUILD_CA_BUNDLE: no file $ca"
    tar -C "$(dirname "$ca")" -rf "$tarball" --transform "s,^.*\$,docker/ca/extra-ca.crt," "$(basename "$ca")"
    log "pip trusts $ca during the build"
  fi
  echo "$tarball"
}

summary=()
timed_build() {  # name log-file docker-build-args...
  local name=$1 logfile=$2; shift 2
  local start=$SECONDS
  log "building $name (log $logfile)"
  if ! docker build "$@" >"$logfile" 2>&1; then
    tail -40 "$logfile" >&2
    die "building $name failed (full log: $logfile)"
  fi
  local size
  size=$(docker image inspect -f '{{.Size}}' "$name" | awk '{printf "%.2f GB", $1/1e9}')
  summary+=("$(printf '%-45s %8s  %5d s' "$name" "$size" $((SECONDS - start)))")
  log "built $name: $size in $((SECONDS - start)) s"
}

total_start=$SECONDS
if [ "${SKIP_BASE:-0}" = 1 ]; then
  docker image inspect "$(image base)" >/dev/null 2>&1 || die "SKIP_BASE=1 but $(image base) does not exist"
  log "reusing $(image base)"
else
  context=$(make_context)
  log "context $(du -h "$context" | cut -f1)"
  timed_build "$(image base)" "$LOG_DIR/base.log" -f docker/base/Dockerfile -t "$(image base)" \
    "${network_args[@]}" "${build_args[@]}" - <"$context"
fi
for stage in $STAGES; do
  timed_build "$(image "$stage")" "$LOG_DIR/$stage.log" -f "$ROOT/docker/$stage/Dockerfile" \
    -t "$(image "$stage")" --build-arg "BASE=$(image base)" "$ROOT/docker/$stage"
done

log "done in $((SECONDS - total_start)) s"
printf '%s\n' "${summary[@]}" >&2
