"""The alert rules evaluated by Prometheus' own rule engine: `promtool test rules`.

Every file in tests/promtool/ is a promtool unit test. The PrometheusRule objects in
daemonset/prometheus/ are written out as the plain rule files promtool reads (their `spec`), next
to copies of the tests, and promtool runs them. promtool is Debian's `prometheus` package
(scripts/system-deps.sh); without it these tests fail rather than skip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "daemonset" / "prometheus"
PROMTOOL_TESTS = Path(__file__).resolve().parent / "promtool"


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool not found: install Debian's prometheus (scripts/system-deps.sh)"
    return path


def rule_files() -> dict[str, dict[str, Any]]:
    """<name>.rules.yaml -> the plain rule file of each PrometheusRule in daemonset/prometheus/."""
    out = {}
    for path in sorted(RULES.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        assert doc["kind"] == "PrometheusRule", path
        out[f"{path.stem}.rules.yaml"] = doc["spec"]
    return out


def write_rules(directory: Path, change: dict[str, str] | None = None) -> None:
    """Rule files into directory; `change` replaces text in the rendered rules (mutation tests)."""
    for name, spec in rule_files().items():
        text = yaml.safe_dump(spec, sort_keys=False)
        for old, new in (change or {}).items():
            text = text.replace(old, new)
        (directory / name).write_text(text)


def run_promtool(directory: Path, test_file: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(PROMTOOL_TESTS / test_file, directory / test_file)
    return subprocess.run(
        [promtool(), "test", "rules", test_file],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


TEST_FILES = sorted(p.name for p in PROMTOOL_TESTS.glob("*_test.yaml"))


def test_rule_files_are_valid(tmp_path: Path) -> None:
    write_rules(tmp_path)
    names = sorted(rule_files())
    result = subprocess.run(
        [promtool(), "check", "rules", *names],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("test_file", TEST_FILES)
def test_promtool_rule_tests_pass(tmp_path: Path, test_file: str) -> None:
    write_rules(tmp_path)
    result = run_promtool(tmp_path, test_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_changed_threshold_fails_the_alert_tests(tmp_path: Path) -> None:
    # The fixtures pin the rules down: raising the samples-lost threshold from 1% to 3% must make
    # the case that has to fire fail, and so must opening the circuit alert to half-open.
    for change in ({"> 0.01": "> 0.03"}, {"== 2": ">= 1"}):
        write_rules(tmp_path, change)
        result = run_promtool(tmp_path, "alerts_test.yaml")
        assert result.returncode != 0, f"{change}: promtool still passes"
        assert "FAILED" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {
        rule["alert"]
        for spec in rule_files().values()
        for group in spec["groups"]
        for rule in group["rules"]
        if "alert" in rule
    }
    firing: set[str] = set()
    silent: set[str] = set()
    for test_file in TEST_FILES:
        doc = yaml.safe_load((PROMTOOL_TESTS / test_file).read_text())
        for case in doc["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts <= firing, f"never seen firing: {alerts - firing}"
    assert alerts <= silent, f"never checked silent: {alerts - silent}"
