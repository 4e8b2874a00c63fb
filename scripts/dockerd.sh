#!/usr/bin/env bash
# A private Docker engine for the image checks, from Debian's packages
# (scripts/tools.sh docker), rootful, with no bridge and no iptables: builds
# use --network none, containers --network host. Its data lives in the cache,
# so base images and layers survive between runs.
#
#   scripts/dockerd.sh start        starts it (or finds it running); prints
#                                   `export DOCKER_HOST=... PATH=...` lines
#   scripts/dockerd.sh stop         stops it
#   scripts/dockerd.sh base-image   builds local/debian:bookworm-minbase with
#                                   debootstrap (once; no image registry needed)
set -euo pipefail

CACHE=${PLEURA_CACHE:-$HOME/.cache/pleura}
ENGINE=$CACHE/tools/docker-engine
D=$CACHE/docker
# Socket paths must stay short (108 bytes), so the runtime state sits in /run.
RUN=/run/pleura-docker
export PATH="$ENGINE/usr/bin:$ENGINE/usr/sbin:$PATH"
export DOCKER_HOST="unix://$RUN/docker.sock" DOCKER_BUILDKIT=1
BASE_IMAGE=local/debian:bookworm-minbase

env_lines() {
  echo "export PATH=\"$ENGINE/usr/bin:$ENGINE/usr/sbin:\$PATH\""
  echo "export DOCKER_HOST=\"$DOCKER_HOST\" DOCKER_BUILDKIT=1"
}

running() {
  docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

start() {
  if running; then env_lines; return 0; fi
  [ "$(id -u)" = 0 ] || { echo "dockerd.sh: the engine runs rootful: run as root" >&2; exit 1; }
  [ -x "$ENGINE/usr/sbin/dockerd" ] || "$(dirname "$0")/tools.sh" docker
  mkdir -p "$D/data" "$RUN"
  # A stale pid file from a killed engine would stop a new one from starting.
  rm -f "$RUN/dockerd.pid"
  nohup dockerd --data-root "$D/data" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" \
    -H "$DOCKER_HOST" --bridge=none --iptables=false --ip6tables=false --ip-masq=false \
    --userland-proxy=false >"$D/dockerd.log" 2>&1 &
  for _ in $(seq 1 100); do
    if running; then env_lines; return 0; fi
    sleep 0.2
  done
  echo "dockerd.sh: the Docker engine did not start; its log ($D/dockerd.log) ends:" >&2
  tail -20 "$D/dockerd.log" >&2
  exit 1
}

stop() {
  if [ -f "$RUN/dockerd.pid" ]; then
    local pid
    pid=$(cat "$RUN/dockerd.pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  umount "$RUN/exec/netns/default" 2>/dev/null || true
}

base_image() {
  running || { echo "dockerd.sh: start the engine first" >&2; exit 1; }
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then return 0; fi
  local mirror root
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
  mirror=${mirror:-http://deb.debian.org/debian}
  root=$(mktemp -d "$D/rootfs.XXXXXX")
  echo "dockerd.sh: building $BASE_IMAGE with debootstrap from $mirror (about a minute, once)" >&2
  DEBOOTSTRAP_DIR="$ENGINE/usr/share/debootstrap" debootstrap --variant=minbase \
    --include=ca-certificates bookworm "$root" "$mirror" >"$D/debootstrap.log" 2>&1 || {
    echo "dockerd.sh: debootstrap failed; see $D/debootstrap.log" >&2; rm -rf "$root"; exit 1; }
  # No package lists or caches in the image.
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
  tar -C "$root" -c . | docker import - "$BASE_IMAGE" >/dev/null
  rm -rf "$root"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  base-image) base_image ;;
  env) env_lines ;;
  *) echo "usage: $0 start|stop|base-image|env" >&2; exit 2 ;;
esac
