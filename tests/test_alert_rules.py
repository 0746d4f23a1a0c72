"""The alert rules evaluated by Prometheus' own rule engine: `promtool test rules`.

Every file in tests/promtool/ is a promtool unit test. The PrometheusRule objects in
daemonset/prometheus/ are written out as the plain rule files promtool reads (their `spec`), next
to copies of the tests, and promtool runs them. promtool is Debian's `prometheus` package
(scripts/system-deps.sh); without it these tests fail rather than skip.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from support import PROMTOOL_TESTS, promtool, rule_files, run_promtool, write_rules

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
        (tmp_path / "alerts_test.yaml").unlink(missing_ok=True)
        result = run_promtool(tmp_path, "alerts_test.yaml")
        assert result.returncode != 0, f"{change}: promtool still passes"
        assert "FAILED" in result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    # recording-rules.yaml's cluster drift alert is tested on generated series, firing and
    # silent, in test_cluster_drift_rules.py.
    alerts = {
        rule["alert"]
        for group in rule_files()["alerts.rules.yaml"]["groups"]
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
