"""A real Prometheus on loopback (Debian's `prometheus` package), for the demo and the tests.

It scrapes the given targets every second and evaluates the rule files of daemonset/prometheus/
(PrometheusRule objects, whose `spec` is a plain rule file) every second, in its own temporary
storage. Queries go through its HTTP API, so what they return is what a dashboard would show.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

import infertap

# daemonset/prometheus/ in a checkout (the package itself does not carry the Kubernetes assets).
RULES_DIR = Path(infertap.__file__).resolve().parent.parent / "daemonset" / "prometheus"


class PrometheusError(RuntimeError):
    pass


def plain_rule_files(source: Path = RULES_DIR) -> dict[str, dict[str, Any]]:
    """<stem>.rules.yaml -> the rule file (`spec`) of each PrometheusRule in `source`."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(source.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "PrometheusRule":
            out[f"{path.stem}.rules.yaml"] = doc["spec"]
    return out


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PrometheusApi:
    """Queries over a Prometheus server's HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; returns `data`, or raises PrometheusError with Prometheus' error."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # a bad query: Prometheus says why in the body
            body = json.load(e)
        except (urllib.error.URLError, OSError) as e:
            raise PrometheusError(f"{self.url} unreachable: {e}") from None
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query now: [{"metric": {labels}, "value": [ts, "value"]}, ...]."""
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] == "vector" else []
        return result

    def query_range(self, expr: str, seconds: float, step_s: float = 1.0) -> list[dict[str, Any]]:
        """A range query over the last `seconds`, as a dashboard panel runs it: one entry per
        series with any point in the range."""
        end = time.time()
        data = self.api(
            "query_range",
            query=expr,
            start=f"{end - seconds:.3f}",
            end=f"{end:.3f}",
            step=str(step_s),
        )
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        return bool(active) and all(t["health"] == "up" for t in active)

    def wait_scraped(self, expr: str, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Until `expr` returns series (a scrape and a rule evaluation have happened)."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.query(expr)
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def alerts(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return found


class LocalPrometheus(PrometheusApi):
    """`prometheus` scraping `targets` (host:port, job "infertap") on 127.0.0.1."""

    def __init__(self, workdir: Path, targets: list[str], interval_s: int = 1) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusError("prometheus not found (Debian package prometheus)")
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        rule_names = []
        for name, spec in plain_rule_files().items():
            (workdir / name).write_text(yaml.safe_dump(spec, sort_keys=False))
            rule_names.append(name)
        config = {
            "global": {
                "scrape_interval": f"{interval_s}s",
                "evaluation_interval": f"{interval_s}s",
            },
            "rule_files": rule_names,
            "scrape_configs": [{"job_name": "infertap", "static_configs": [{"targets": targets}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.port = _free_loopback_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.rule_files = rule_names
        self._log = (workdir / "prometheus.log").open("w")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
        )
        try:
            self._wait_ready(30.0)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise PrometheusError(f"prometheus not ready in {timeout_s:.0f} s: {self.log_tail()}")

    def log_tail(self) -> str:
        return (self.workdir / "prometheus.log").read_text()[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> LocalPrometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
