#!/usr/bin/env bash
# `make image`: the agent image, built here from Debian packages and this checkout, no registry.
#   1. mmdebstrap makes a Debian 12 root file system holding the image's Debian packages, from the
#      host's own apt sources, with a fixed SOURCE_DATE_EPOCH (same mirror state, same rootfs);
#      `podman import` turns it into the base image (kept, labelled with a hash of the package
#      list and the sources, and rebuilt only when they change).
#   2. `podman build` runs daemonset/Dockerfile on that base (BASE build argument) over a copy of
#      the checkout's files (git ls-files: what is tracked or new, never .venv or build/), so the
#      agent and its pinned Python dependencies (pyproject.toml) are installed from this checkout.
# Result: localhost/infertap/agent:0.1.0, the name the DaemonSet uses (infertap/agent:0.1.0).
set -euo pipefail
cd "$(dirname "$0")/.."

image=localhost/infertap/agent:0.1.0
base=localhost/infertap/debian-base:bookworm
out=build/image
# The Debian packages of the image (daemonset/Dockerfile installs the same list on debian:12-slim).
packages=python3,python3-venv,python3-bpfcc,bpftool,iproute2,ca-certificates

# This machine: cgroups are hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified), which crun
# refuses ("cgroups in hybrid mode not supported"); runc runs there. root lacks CAP_SYS_RESOURCE,
# so a container's rlimits may not exceed podman's own: the open-files hard limit, and 32768
# processes (podman lowers its own RLIMIT_NPROC to that; seen in /proc/<podman>/limits).
nproc=$(ulimit -Hu); [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ] && nproc=32768
podman=(podman --runtime runc)
limits=(--ulimit "nofile=$(ulimit -Hn):$(ulimit -Hn)" --ulimit "nproc=$nproc:$nproc")

for tool in mmdebstrap podman runc; do
  command -v "$tool" >/dev/null || { echo "infertap: $tool missing: scripts/system-deps.sh image" >&2; exit 1; }
done
sources=/etc/apt/sources.list.d/debian.sources
[ -f "$sources" ] || sources=/etc/apt/sources.list
mkdir -p "$out"
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)

key=$(printf '%s\n' "$packages" "$(cat "$sources")" | sha256sum | cut -c1-16)
have=$("${podman[@]}" image inspect --format '{{index .Labels "infertap.base"}}' "$base" 2>/dev/null || true)
if [ "$have" != "$key" ]; then
  start=$SECONDS
  rm -f "$out/rootfs.tar"
  SOURCE_DATE_EPOCH=$epoch mmdebstrap --quiet --variant=apt --include="$packages" \
    --aptopt='Acquire::Languages "none"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$out/rootfs.tar" "$sources"
  "${podman[@]}" import --quiet --change 'CMD ["/bin/bash"]' --change "LABEL infertap.base=$key" \
    "$out/rootfs.tar" "$base" >/dev/null
  rm -f "$out/rootfs.tar"
  echo "base image $base: $((SECONDS - start)) s"
fi

# Rebuilt only when the checkout's files changed since the image was built (label below).
# (Links to folders, like infertap/agent, make sha256sum complain; their files are hashed anyway.)
source_hash=$( (git ls-files -z --cached --others --exclude-standard \
  | xargs -0 sha256sum 2>/dev/null || true) | sha256sum | cut -c1-16)
if [ "$("${podman[@]}" image inspect --format '{{index .Labels "infertap.source"}}' "$image" 2>/dev/null)" \
     = "$source_hash" ]; then
  echo "image $image is up to date with this checkout ($source_hash)"
  exit 0
fi

start=$SECONDS
rm -rf "$out/context"
mkdir -p "$out/context"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$out/context"
# The Python dependencies, pinned by pyproject.toml, as wheels fetched here with the host's pip
# configuration (kept in build/image/wheels between builds): the build itself needs no index.
.venv/bin/pip download --quiet --disable-pip-version-check --dest "$out/wheels" \
  . grpcio-tools==1.85.1 'setuptools>=68' wheel 2>/dev/null
rm -f "$out"/wheels/infertap-*
cp -r "$out/wheels" "$out/context/wheels"
"${podman[@]}" build --quiet --pull=never --squash --timestamp="$epoch" "${limits[@]}" \
  --network=none --label infertap.source="$source_hash" --build-arg BASE="$base" \
  --build-arg PIP_OPTIONS="--no-index --find-links /src/wheels" -f daemonset/Dockerfile -t "$image" "$out/context" >/dev/null
rm -rf "$out/context"
"${podman[@]}" image prune --force >/dev/null  # the previous build's image, now untagged
echo "image $image: $((SECONDS - start)) s, $("${podman[@]}" image inspect --format '{{.Size}}' "$image" | numfmt --to=iec) bytes"
