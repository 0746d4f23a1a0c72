"""TCP peers that run inside test pods, driven over stdin/stdout with one command per line.

    python -m infertap.agent.testbed.peer serve PORT [--echo]
        accept connections; read and discard (or echo back) everything; prints "ready".
    python -m infertap.agent.testbed.peer client HOST PORT [--nonblocking]
        connect, print "connected", then obey commands:
            send N SEED   send N bytes of payload(N, SEED) in one sendall: "ok N" or "err NAME"
            recv N        read exactly N bytes: "ok N" or "err NAME"
            expect N SEED read N bytes and compare with payload(N, SEED): "ok N" or "err MISMATCH N"
            close         close the socket: "ok 0"

The same `payload` function is used by tests to know exactly which bytes were sent.
"""

from __future__ import annotations

import errno
import random
import socket
import sys
import threading


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _serve(port: int, echo: bool) -> None:
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    print("ready", flush=True)

    def handle(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 20)
                except OSError:
                    return
                if not data:
                    return
                if echo:
                    try:
                        conn.sendall(data)
                    except OSError:
                        return

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _client(host: str, port: int, nonblocking: bool) -> None:
    sock = socket.create_connection((host, port), timeout=30)
    if not nonblocking:
        sock.settimeout(None)  # a blocking socket, like most simple clients
    # else: Python keeps a socket with a timeout non-blocking underneath, like grpcio, asyncio
    # or Envoy; sendall then retries short writes, which is what makes sk_msg skip bytes.
    print("connected", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if not cmd:
            continue
        try:
            if cmd[0] == "send":
                data = payload(int(cmd[1]), int(cmd[2]))
                sock.sendall(data)
                print(f"ok {len(data)}", flush=True)
            elif cmd[0] == "recv":
                want, got = int(cmd[1]), 0
                while got < want:
                    chunk = sock.recv(min(1 << 20, want - got))
                    if not chunk:
                        raise ConnectionResetError(errno.ECONNRESET, "closed")
                    got += len(chunk)
                print(f"ok {got}", flush=True)
            elif cmd[0] == "expect":
                expected = payload(int(cmd[1]), int(cmd[2]))
                received = bytearray()
                while len(received) < len(expected):
                    chunk = sock.recv(min(1 << 20, len(expected) - len(received)))
                    if not chunk:
                        raise ConnectionResetError(errno.ECONNRESET, "closed")
                    received += chunk
                verdict = "ok" if bytes(received) == expected else "err MISMATCH"
                print(verdict, len(expected), flush=True)
            elif cmd[0] == "close":
                sock.close()
                print("ok 0", flush=True)
                return
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, "EUNKNOWN")
            print(f"err {name}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        _serve(int(argv[1]), "--echo" in argv[2:])
        return 0
    if len(argv) >= 3 and argv[0] == "client":
        _client(argv[1], int(argv[2]), "--nonblocking" in argv[3:])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
