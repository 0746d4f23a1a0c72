"""Names taken from traffic (model, version, URL path), made safe to show and export.

A client chooses the model name, version and path it sends, so they are payload like any other:
a model called `jane@example.com` or a version `4111 1111 1111 1111` would otherwise reach metric
labels, events, the mirror sink, `top` and log lines as it is. Every such value passes the PII
redactor here, once, where the InferenceEvent is made (agent/models/adapt.py) and where HTTP
events are shaped, so nothing after that sees the raw value. Then it is cut to a bounded length
(after redaction, so a cut can never split a PII value into pieces the scanner would miss).

Every built-in PII type is redacted, whatever the policy turns on for findings: a label is no
place for PII even when findings are off. One consequence: a four-part dotted version such as
`1.0.0.1` reads as an IPv4 address and is shown as `<ipv4:1.*.*.*>`.
"""

from __future__ import annotations

import functools
import urllib.parse
from typing import Final

from infertap.agent.inspect.pii import PiiScanner

MAX_NAME_CHARS: Final = 128  # model names, versions
MAX_PATH_CHARS: Final = 256

_REDACTOR: Final = PiiScanner()  # every built-in type; its fingerprint secret is never used here


@functools.lru_cache(maxsize=4096)  # the same few names arrive on every call
def _redacted_short(value: str) -> str:
    return _REDACTOR.redact_text(value)


def _redacted(value: str) -> str:
    # Only short values are cached, so the cache stays small whatever the traffic sends.
    return _redacted_short(value) if len(value) <= 256 else _REDACTOR.redact_text(value)


def safe_name(value: str, limit: int = MAX_NAME_CHARS) -> str:
    """`value`, percent-decoded, with PII replaced by its redacted hint
    (`<email:j***@e***.com>`), at most `limit` characters."""
    if not value:
        return value
    out = _redacted(_percent_decoded(value))
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _percent_decoded(value: str) -> str:
    """Clients send `jane%40example.com` (tritonclient quotes model names), and servers quote it
    back in errors: decoded (up to three times, for double encoding) so the scanner sees it."""
    for _ in range(3):
        if "%" not in value:
            break
        decoded = urllib.parse.unquote(value)
        if decoded == value:
            break
        value = decoded
    return value


def safe_path(path: str) -> str:
    """A URL path without its query string (where PII travels most), percent-decoded, PII
    redacted, bounded."""
    return safe_name(path.split("?", 1)[0], MAX_PATH_CHARS)
