#!/usr/bin/env bash
# Install the Debian packages infertap needs, idempotently: apt runs only when something is missing.
#   scripts/system-deps.sh          packages to build, run and test the agent
#   scripts/system-deps.sh bench    and the tools the data-path benchmark compares against
set -euo pipefail

arch=$(dpkg --print-architecture)
packages=(
  python3-bpfcc          # BCC: compiles and loads our programs (never PyPI's unrelated 'bcc')
  "linux-headers-$arch"  # kernel headers BCC compiles against (closest version; see agent/kernel/headers.py)
  bpftool                # independent view of attached programs, used by tests to check cleanup
  python3-venv           # the venv at .venv is made from Debian's python3 so it can import bcc
  python3-dev
  iproute2               # ip netns, for test pods
  iptables               # tests assert that infertap leaves the nat table alone
  ruby                   # tests/test_manifests.py checks the Vagrantfile with `ruby -c`
  prometheus             # promtool unit-tests the alert and recording rules; a real server in the demo
  mmdebstrap             # make image: the image's Debian root file system, from the host's apt sources
  podman                 # make image builds the agent image; tests run the DaemonSet's container
  runc                   # podman's runtime here (crun refuses hybrid cgroup hierarchies)
)
if [ "${1:-}" = "bench" ]; then
  packages+=(sockperf iperf3 haproxy nghttp2-client nginx-light)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "infertap: missing Debian packages (${missing[*]}); run as root to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
