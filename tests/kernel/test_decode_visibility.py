"""Decoding never stops without a word, checked over real interception with the shared agent:
a header block cut by the sample limit is counted in `infertap_decode_lost_total`, shown by
`infertap status`, and logged once per connection without payload; an HTTP/1 request whose
Content-Length and Transfer-Encoding disagree (which the server answers) raises an
`http_ambiguous_framing` finding and is still reported and paired."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from support import INFERTAP, needs_root

from infertap.agent.testbed.v2server import start_in_pod

pytestmark = [needs_root, pytest.mark.kernel]

HTTP_PORT, GRPC_PORT = 8010, 8011
PAD = "alice@example.com" * 400  # 6800 bytes of header: more than the 4096-byte sample

# Three requests on one keep-alive connection, each with a header block larger than a sample.
BIG_HEADERS = f"""
import http.client, sys
conn = http.client.HTTPConnection(sys.argv[1], {HTTP_PORT}, timeout=10)
for _ in range(3):
    conn.request("GET", "/v2/health/ready", headers={{"x-pad": {PAD!r}}})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
print("done")
"""

# Raw bytes on a real socket: a V2 infer request with both Content-Length and chunked
# Transfer-Encoding. The testbed server (like most) goes by Transfer-Encoding and answers it.
AMBIGUOUS = f"""
import json, socket, sys
doc = json.dumps({{"inputs": [{{"name": "x", "shape": [2], "datatype": "FP32",
                               "data": [1.0, 2.0]}}]}}).encode()
chunked = b"%x\\r\\n" % len(doc) + doc + b"\\r\\n0\\r\\n\\r\\n"
req = (b"POST /v2/models/echo/infer HTTP/1.1\\r\\nHost: m\\r\\nContent-Type: application/json\\r\\n"
       b"Content-Length: 3\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n" + chunked)
s = socket.create_connection((sys.argv[1], {HTTP_PORT}), timeout=10)
s.sendall(req)
got = b""
while b"\\r\\n\\r\\n" not in got:
    got += s.recv(65536)
print(got.split(b"\\r\\n", 1)[0].decode())
"""


@pytest.fixture(scope="module")
def v2server(lab: Any) -> Any:
    server = lab.pods["server"]
    start_in_pod(server, HTTP_PORT, GRPC_PORT)
    return server


def lost_series(agent: Any, protocol: str, reason: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics.port}/metrics").read().decode()
    want = f'infertap_decode_lost_total{{protocol="{protocol}",reason="{reason}"}}'
    for line in body.splitlines():
        if line.startswith(want):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def status(agent: Any, *extra: str) -> str:
    return subprocess.run(
        [*INFERTAP, "status", *extra, "--api", agent.options.api_addr],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_header_block_cut_by_the_sample_is_counted_shown_and_logged_once(
    agent: Any, lab: Any, v2server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    before = lost_series(agent, "http1", "header_gap")
    with caplog.at_level(logging.WARNING, logger="infertap.agent.protocols.losses"):
        done = lab.pods["client"].run(
            [sys.executable, "-c", BIG_HEADERS, v2server.ip], capture_output=True, text=True
        )
        assert done.returncode == 0 and "done" in done.stdout, done.stderr[-2000:]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if lost_series(agent, "http1", "header_gap") >= before + 3:
                break
            time.sleep(0.1)
    assert lost_series(agent, "http1", "header_gap") == before + 3
    mine = [
        r.getMessage()
        for r in caplog.records
        if f"{v2server.ip}:{HTTP_PORT}" in r.getMessage() and "header_gap" in r.getMessage()
    ]
    assert len(mine) == 1, mine  # once for the connection, not once per loss
    assert not any("alice" in r.getMessage() for r in caplog.records)

    doc = json.loads(status(agent, "--json"))
    assert int(doc["decode_lost"]["http1/header_gap"]) >= before + 3
    text = status(agent)
    assert "decode lost:" in text and "http1/header_gap" in text


def test_conflicting_content_length_and_transfer_encoding_raise_a_finding(
    agent: Any, lab: Any, v2server: Any
) -> None:
    sub = agent.events.subscribe(frozenset({"finding", "http"}))
    before = lost_series(agent, "http1", "ambiguous_framing")
    try:
        done = lab.pods["client"].run(
            [sys.executable, "-c", AMBIGUOUS, v2server.ip], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith("HTTP/1.1 200"), done.stdout  # the server did answer
        finding = http = None
        deadline = time.monotonic() + 10
        while (finding is None or http is None) and time.monotonic() < deadline:
            ev = sub.get(timeout=0.5)
            if ev is None or f"{v2server.ip}:{HTTP_PORT}" not in json.dumps(ev.data):
                continue
            if ev.kind == "finding" and ev.data["type"] == "http_ambiguous_framing":
                finding = ev.data
            elif ev.kind == "http" and ev.data["request"]["path"] == "/v2/models/echo/infer":
                http = ev.data
    finally:
        sub.close()
    assert finding is not None, "no http_ambiguous_framing finding"
    assert finding["kind"] == "protocol" and finding["location"] == "request"
    assert finding["path"] == "/v2/models/echo/infer"
    # The request did not vanish: reported, and paired with the answer the server gave.
    assert http is not None and http["response"]["status"] == 200
    assert lost_series(agent, "http1", "ambiguous_framing") == before + 1
