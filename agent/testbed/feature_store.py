"""A feature-store client for the demo: calls the fraud model over KServe V2 with tritonclient,
alternating REST and gRPC, in three phases:

    normal  transactions like the training data
    pii     the same, but each request's parameters carry customer details that should not be
            there (an email, a card number, an SSN): PII leaking into model traffic
    drift   transaction amounts and risk scores shifted far from the training data

    python -m infertap.agent.testbed.feature_store HOST HTTP_PORT GRPC_PORT SECONDS [--rate N]

Prints "phase NAME" when a phase starts, and "done N" at the end (N calls made). Calls that fail
(for instance while the circuit breaker has the service blocked) are counted, not fatal.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from infertap.agent.testbed.fraud_model import example_transactions

PHASES = (("normal", 0.4), ("pii", 0.2), ("drift", 0.4))
LEAKS = (
    {"customer_email": "jane.doe@example.com"},
    {"note": "card 4111 1111 1111 1111 exp 09/29"},
    {"customer": "ssn 123-45-6789, phone +1 415 555 2671"},
)


def main(argv: list[str]) -> int:
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    host, http_port, grpc_port, seconds = argv[0], argv[1], argv[2], float(argv[3])
    rate = float(argv[argv.index("--rate") + 1]) if "--rate" in argv else 20.0
    rng = np.random.default_rng(7)
    http = httpclient.InferenceServerClient(url=f"{host}:{http_port}", connection_timeout=5.0)
    grpc = grpcclient.InferenceServerClient(url=f"{host}:{grpc_port}")
    start = time.monotonic()
    calls = failures = 0
    phase_at = 0.0
    for name, share in PHASES:
        print(f"phase {name}", flush=True)
        phase_at += share * seconds
        while time.monotonic() - start < phase_at:
            x = example_transactions(4, rng, fraud_rate=0.05)
            if name == "drift":
                x[:, 0] *= 6.0  # amounts six times larger than in training
                x[:, 4] = np.clip(x[:, 4] + 0.5, 0.0, 1.0)  # risk scores pushed up
            params = LEAKS[calls % len(LEAKS)] if name == "pii" else None
            try:
                if calls % 2 == 0:
                    inp = httpclient.InferInput("features", list(x.shape), "FP32")
                    inp.set_data_from_numpy(x, binary_data=False)
                    http.infer("fraud", [inp], parameters=params)
                else:
                    ginp = grpcclient.InferInput("features", list(x.shape), "FP32")
                    ginp.set_data_from_numpy(x)
                    grpc.infer("fraud", [ginp], parameters=params, client_timeout=5.0)
            except Exception:  # blocked by the breaker, or the server went away: keep going
                failures += 1
                http.close()
                http = httpclient.InferenceServerClient(url=f"{host}:{http_port}")
            calls += 1
            time.sleep(1.0 / rate)
    print(f"done {calls} failed {failures}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
