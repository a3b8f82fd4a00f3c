#!/usr/bin/env bash
# Push REGISTRY/dcml-base:TAG and REGISTRY/dcml-<stage>:TAG (built by
# docker/build.sh) to their registry. Log in first (docker login REGISTRY).
#
#   bash docker/push.sh REGISTRY TAG           (make push REGISTRY=... TAG=...)
#
# Env: STAGES (default all seven), DRY_RUN=1 prints the pushes only.
set -euo pipefail

REGISTRY=${1:?usage: push.sh REGISTRY TAG}
TAG=${2:?usage: push.sh REGISTRY TAG}
STAGES=${STAGES:-"ingest extract cluster train finetune evaluate compress"}

log() { echo "[push] $*" >&2; }
case "$TAG" in
  latest|"") log "error: refusing tag '$TAG': push the commit tag the pipeline pins"; exit 1;;
esac
if [ "$REGISTRY" = dcml ] || [[ "$REGISTRY" != */* && "$REGISTRY" != *.* && "$REGISTRY" != *:* ]]; then
  log "warning: '$REGISTRY' looks like a local name, not a registry (e.g. ghcr.io/ORG or REGISTRY_HOST:5000/dcml)"
fi

images=("$REGISTRY/dcml-base:$TAG")
for stage in $STAGES; do images+=("$REGISTRY/dcml-$stage:$TAG"); done

missing=0
for image in "${images[@]}"; do
  if ! docker image inspect "$image" >/dev/null 2>&1; then
    log "error: $image not built (run: make images REGISTRY=$REGISTRY TAG=$TAG)"; missing=1
  fi
done
[ "$missing" = 0 ] || exit 1

for image in "${images[@]}"; do
  if [ "${DRY_RUN:-0}" = 1 ]; then echo "docker push $image"; continue; fi
  log "pushing $image"
  docker push "$image"
done
[ "${DRY_RUN:-0}" = 1 ] && exit 0
log "pushed ${#images[@]} images; compile or submit with --image-registry $REGISTRY --image-tag $TAG"
