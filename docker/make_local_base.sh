#!/usr/bin/env bash
# Make a Debian bookworm base image (Python 3.11) without pulling from any
# registry: debootstrap a minimal root filesystem and `docker import` it.
# For machines that reach a Debian mirror but no container registry.
#
#   bash docker/make_local_base.sh            # prints the image name last
#
# Env knobs:
#   LOCAL_BASE_IMAGE  image name (default dcml-local/debian-bookworm:<hash of
#                     suite, mirror and package list>); reused if it exists
#   DEBIAN_MIRROR     default http://deb.debian.org/debian
#   FORCE=1           rebuild even when the image exists
#   KEEP_ROOTFS=1     keep the debootstrap folder (for debugging)
set -euo pipefail

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3 is 3.11 on bookworm; python3-venv brings ensurepip; libgomp1 for
# faiss/torch OpenMP; passwd for useradd in the base Dockerfile.
PACKAGES=python3,python3-venv,python3-pip,ca-certificates,libgomp1,passwd,procps,tzdata

log() { echo "[make_local_base] $*" >&2; }

if [ "$(id -u)" != 0 ]; then
  log "needs root (debootstrap and docker import)"; exit 1
fi
for tool in debootstrap docker; do
  command -v "$tool" >/dev/null || { log "missing $tool: apt-get install -y debootstrap docker.io"; exit 1; }
done

hash=$(printf '%s\n' "$SUITE" "$MIRROR" "$PACKAGES" | sha256sum | cut -c1-12)
IMAGE=${LOCAL_BASE_IMAGE:-dcml-local/debian-bookworm:$hash}

if [ "${FORCE:-0}" != 1 ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "reusing $IMAGE"
  echo "$IMAGE"
  exit 0
fi

workdir=$(mktemp -d /tmp/dcml-debootstrap.XXXXXX)
rootfs="$workdir/rootfs"
cleanup() { [ "${KEEP_ROOTFS:-0}" = 1 ] || rm -rf "$workdir"; }
trap cleanup EXIT

log "debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR into $rootfs"
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$workdir/debootstrap.log" 2>&1 || {
  tail -30 "$workdir/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }

# Same apt sources a stock debian:bookworm image has, so `apt-get install`
# works in derived images.
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb http://deb.debian.org/debian-security $SUITE-security main
EOF
# Slim it down: package lists, caches, docs and man pages are not needed.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
  "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
  "$rootfs"/tmp/* "$rootfs"/var/log/*.log
chroot "$rootfs" python3 --version >&2

log "docker import -> $IMAGE"
tar -C "$rootfs" --numeric-owner -c . | docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "debootstrap --variant=minbase $SUITE + $PACKAGES" \
  - "$IMAGE" >/dev/null
log "done in $(( $(date +%s) - start )) s: $(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
echo "$IMAGE"
