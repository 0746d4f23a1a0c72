"""The polyfill rewriter: one process per client pod, run in the pod's network namespace (by the
agent, in the agent's cgroup, so its own connects are never polyfilled again).

    python -m infertap.agent.polyfill.rewriter '<config json>'

Config: {"services": [{"service": "ip:port", "rules": [{"model": "fraud", "version": "2" | null,
"set_parameters": {"name": value}}]}]}. One listener per service on 127.0.0.1 (port chosen by the
kernel); the connect hook sends the client's connections for that service to it, so the listener
is the answer to "where was this going" (SO_ORIGINAL_DST is answered on the client's socket, not
on ours: the rewriter's accepted socket is a different socket).

Client -> service: HTTP/1.1 requests are parsed one by one (Content-Length bodies, keep-alive,
pipelining). A `POST /v2/models/{m}[/versions/{v}]/infer` with a JSON body matching a rule gets the
rule's parameters that are missing from its top-level "parameters" object; Content-Length (and
Inference-Header-Content-Length for binary tensors) follow. Everything else is relayed byte for
byte; anything the parser does not handle (chunked bodies, Expect, upgrades, huge headers, bad
JSON) turns the rest of that connection into a plain byte relay. Service -> client: a byte relay.

Events go to stdout, one JSON line each: ready (with the ports), conn, done (with counts)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import sys
from dataclasses import dataclass, field
from typing import Any

_INFER = re.compile(rb"/v2/models/([^/?]+)(?:/versions/([^/?]+))?/infer")
_MAX_BODY = 64 << 20  # larger bodies are relayed, not rewritten: no unbounded buffering


@dataclass(frozen=True, slots=True)
class Rule:
    model: str
    version: str | None
    set_parameters: dict[str, Any]


@dataclass(slots=True)
class Counts:
    requests: int = 0
    rewritten: int = 0
    passthrough: str = ""  # why the connection became a byte relay, if it did


@dataclass(slots=True)
class Service:
    host: str
    port: int
    rules: list[Rule] = field(default_factory=list)


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for k, v in headers:
        if k.lower() == name:
            return v.strip()
    return None


def rewrite(head: bytes, body: bytes, rules: list[Rule]) -> bytes | None:
    """The request with the missing parameters added, or None to send it as it came."""
    lines = head[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST":
        return None
    m = _INFER.fullmatch(parts[1].split(b"?", 1)[0])
    if not m:
        return None
    model = m[1].decode("latin-1")
    version = m[2].decode("latin-1") if m[2] is not None else None
    rule = next(
        (r for r in rules if r.model == model and (r.version is None or r.version == version)),
        None,
    )
    if rule is None:
        return None
    headers = [tuple(ln.split(b":", 1)) for ln in lines[1:]]
    if any(len(h) != 2 for h in headers):
        return None
    hdrs: list[tuple[bytes, bytes]] = [(h[0], h[1]) for h in headers]
    encoding = _header(hdrs, b"content-encoding")
    if encoding is not None and encoding.lower() != b"identity":
        return None  # compressed JSON: not ours to open
    # Binary tensor extension: the JSON is the first Inference-Header-Content-Length bytes.
    ihcl = _header(hdrs, b"inference-header-content-length")
    json_len = int(ihcl) if ihcl is not None and ihcl.isdigit() else len(body)
    if (ihcl is not None and not ihcl.isdigit()) or json_len > len(body):
        return None
    try:
        doc = json.loads(body[:json_len])
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        return None
    missing = {k: v for k, v in rule.set_parameters.items() if k not in params}
    if not missing:
        return None  # already there: the request goes unchanged, byte for byte
    doc["parameters"] = {**params, **missing}
    new_json = json.dumps(doc, separators=(",", ":")).encode()
    new_body = new_json + body[json_len:]
    out = [lines[0]]
    for k, v in hdrs:
        name = k.lower().strip()
        if name == b"content-length":
            v = b" " + str(len(new_body)).encode()
        elif name == b"inference-header-content-length":
            v = b" " + str(len(new_json)).encode()
        out.append(k + b":" + v)
    return b"\r\n".join(out) + b"\r\n\r\n" + new_body


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(Exception):
            writer.write_eof()


async def requests(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rules: list[Rule], counts: Counts
) -> None:
    """Client -> service, request by request; falls back to a byte relay on anything odd."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:  # a connection closing mid-header: send what there was
                writer.write(exc.partial)
            break
        except asyncio.LimitOverrunError:
            counts.passthrough = "headers too large"
            break  # the header stays in the reader's buffer: the relay below sends it
        counts.requests += 1
        lines = head[:-4].split(b"\r\n")
        hdrs = [(h[0], h[1]) for h in (ln.split(b":", 1) for ln in lines[1:]) if len(h) == 2]
        cl = _header(hdrs, b"content-length")
        reason = ""
        if _header(hdrs, b"transfer-encoding") is not None:
            reason = "transfer-encoding"
        elif _header(hdrs, b"expect") is not None:
            reason = "expect"  # the client waits for 100 Continue before its body
        elif _header(hdrs, b"upgrade") is not None or lines[0].startswith(b"CONNECT "):
            reason = "upgrade"
        elif cl is not None and (not cl.isdigit() or int(cl) > _MAX_BODY):
            reason = "content-length"
        if reason:
            counts.passthrough = reason
            writer.write(head)
            break
        try:
            body = await reader.readexactly(int(cl)) if cl else b""
        except asyncio.IncompleteReadError as exc:
            writer.write(head + exc.partial)
            break
        try:
            new = rewrite(head, body, rules)
        except Exception:  # never let a rewrite bug cost the request: send it as it came
            new = None
        if new is not None:
            counts.rewritten += 1
            writer.write(new)
        else:
            writer.write(head + body)
        await writer.drain()
    await pipe(reader, writer)


async def handle(
    service: Service, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
) -> None:
    name = f"{service.host}:{service.port}"
    peer = c_writer.get_extra_info("peername")
    emit("conn", service=name, peer=list(peer[:2]) if peer else None)
    counts = Counts()
    try:
        s_reader, s_writer = await asyncio.open_connection(service.host, service.port)
    except OSError as exc:
        emit("done", service=name, error=str(exc), requests=0, rewritten=0)
        c_writer.close()
        return
    try:
        await asyncio.gather(
            requests(c_reader, s_writer, service.rules, counts), pipe(s_reader, c_writer)
        )
    except (OSError, asyncio.IncompleteReadError):
        pass  # a reset on either side: both sockets close below
    finally:
        for w in (s_writer, c_writer):
            w.close()
        emit(
            "done",
            service=name,
            requests=counts.requests,
            rewritten=counts.rewritten,
            passthrough=counts.passthrough,
        )


def parse_config(text: str) -> list[Service]:
    services = []
    for entry in json.loads(text)["services"]:
        host, _, port = str(entry["service"]).rpartition(":")
        rules = [
            Rule(
                str(r["model"]),
                None if r.get("version") is None else str(r["version"]),
                dict(r["set_parameters"]),
            )
            for r in entry["rules"]
        ]
        services.append(Service(host, int(port), rules))
    return services


async def main(config: str) -> None:
    services = parse_config(config)
    servers = []
    ports: dict[str, int] = {}
    for svc in services:
        server = await asyncio.start_server(
            functools.partial(handle, svc), "127.0.0.1", 0, backlog=1024
        )
        servers.append(server)
        ports[f"{svc.host}:{svc.port}"] = server.sockets[0].getsockname()[1]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    emit("ready", ports=ports)
    await stop.wait()
    for server in servers:
        server.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
