"""Finding: what an inspector (PII, drift, schema) reports about model traffic.

Plain data, safe to log, export and keep: a finding never holds a raw PII value, only a redacted
hint and, for PII, a keyed fingerprint (see agent/inspect/pii.py) so repeats can be counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

FindingKind = Literal["pii", "drift", "schema"]
Severity = Literal["info", "warn", "alert"]

SEVERITIES: tuple[Severity, ...] = ("info", "warn", "alert")


def severity_rank(severity: Severity) -> int:
    """0 for info, 1 for warn, 2 for alert: for comparing and sorting severities."""
    return SEVERITIES.index(severity)


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    model: str
    type: str  # pii: "email", "ssn", ...; drift: "psi", "ks", "js"; schema: "nan", "range", ...
    location: str  # JSON path ("$.inputs[0].data[3]"), header name, or feature name
    severity: Severity
    redacted: str = ""  # redacted form of the offending value; never the raw value
    value: float | None = None  # drift statistic, or a count for schema findings
    message: str = ""
    fingerprint: str = ""  # pii: keyed hash (HMAC-SHA256, truncated) of the normalised value
