#!/usr/bin/env bash
# Make .venv from Debian's python3 (the one python3-bpfcc is built for), install the project with
# its pinned dependencies, let the venv see Debian's bcc module (and nothing else from
# dist-packages), and generate the gRPC code. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv .venv
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')

# Only bcc from Debian's dist-packages: a folder holding one link, put on the path by a .pth file.
mkdir -p .venv/debian-bcc
ln -sfn /usr/lib/python3/dist-packages/bcc .venv/debian-bcc/bcc
echo "$PWD/.venv/debian-bcc" > "$site/infertap-debian-bcc.pth"

stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --disable-pip-version-check --upgrade pip setuptools
  .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
  touch "$stamp"
fi

# gRPC code is generated, never committed: regenerate when the .proto is newer.
proto=agent/api/infertap.proto
if [ ! -f agent/api/infertap_pb2.py ] || [ "$proto" -nt agent/api/infertap_pb2.py ]; then
  .venv/bin/python -m grpc_tools.protoc -I . \
    --python_out=. --grpc_python_out=. --pyi_out=. "infertap/$proto"
fi
.venv/bin/python -c 'import bcc, infertap.agent.api.infertap_pb2' 
