"""A small OpenAI-compatible chat server for tests: `POST /v1/chat/completions`, plain or streamed.

The "model" is deterministic: it answers with the words of the last user message in reverse
order, so a test knows exactly what text and how many tokens (one per word) to expect.

- `stream: false`: one `chat.completion` JSON document with `usage`.
- `stream: true`: server-sent events over HTTP/1.1 chunked transfer encoding, one write per chunk
  as real servers do (vLLM, llama.cpp, OpenAI): a role chunk, one content delta per word, a
  chunk with `finish_reason`, with `stream_options.include_usage` a last chunk with empty
  `choices` and `usage`, then `data: [DONE]`.

As a process: `python -m infertap.agent.testbed.openai_server --host H --port P` prints one
"ready" line and serves until SIGTERM/SIGINT. Never logs prompts.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from infertap.agent.testbed.lab import Pod

MODEL = "tiny-chat"


def reply_words(messages: Any) -> list[str]:
    """The model: the last user message's words, in reverse order."""
    text = ""
    if isinstance(messages, list):
        for m in messages:
            if (
                isinstance(m, dict)
                and m.get("role") == "user"
                and isinstance(m.get("content"), str)
            ):
                text = m["content"]
    return list(reversed(text.split())) or ["..."]


def prompt_tokens(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(len(str(m.get("content", "")).split()) for m in messages if isinstance(m, dict))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # each SSE chunk goes out when written
    server_version = "tiny-openai/1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, status: int, doc: Any) -> None:
        body = json.dumps(doc, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        try:
            doc = json.loads(self.rfile.read(length))
        except ValueError:
            self._json(400, {"error": {"message": "body is not JSON", "type": "invalid_request"}})
            return
        if self.path.split("?", 1)[0] != "/v1/chat/completions" or not isinstance(doc, dict):
            self._json(404, {"error": {"message": "not found", "type": "invalid_request"}})
            return
        words = reply_words(doc.get("messages"))
        usage = {
            "prompt_tokens": prompt_tokens(doc.get("messages")),
            "completion_tokens": len(words),
            "total_tokens": prompt_tokens(doc.get("messages")) + len(words),
        }
        model = str(doc.get("model") or MODEL)
        if not doc.get("stream"):
            self._json(
                200,
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                },
            )
            return
        options = doc.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> None:
            event = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": choices,
                **(extra or {}),
            }
            self._send_event(json.dumps(event, separators=(",", ":")))

        chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        for i, word in enumerate(words):
            piece = word if i == 0 else " " + word
            chunk([{"index": 0, "delta": {"content": piece}, "finish_reason": None}])
        chunk([{"index": 0, "delta": {}, "finish_reason": "stop"}])
        if include_usage:
            chunk([], {"usage": usage})
        self._send_event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _send_event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        self.wfile.write(b"%x\r\n" % len(payload) + payload + b"\r\n")  # one write per event
        self.wfile.flush()


def start_openai_server(host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="openai-server", daemon=True).start()
    return server


def start_in_pod(pod: Pod, port: int) -> None:
    """Run this server inside a test pod and wait until it serves."""
    proc = pod.popen(
        [
            sys.executable,
            "-m",
            "infertap.agent.testbed.openai_server",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline().strip() if proc.stdout is not None else ""
    if not line.startswith("openai server ready"):
        raise RuntimeError(f"the OpenAI test server did not start in pod {pod.name}: {line!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="OpenAI-compatible test chat server")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda s, f: stop.set())
    signal.signal(signal.SIGINT, lambda s, f: stop.set())
    server = start_openai_server(args.host, args.port)
    print(f"openai server ready on {args.host}:{server.server_port}", flush=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
