"""PII detection in model traffic: free text, JSON bodies, headers and string tensors.

Built-in types: email, phone, ssn, credit_card, iban, ipv4, ipv6; plus custom regexes by name.

How a scan works: one combined regex (every built-in type's candidate pattern as a named
alternative) finds candidates in a single pass over the text; each candidate is then validated
by its type's rules (Luhn, mod-97, SSN ranges, `ipaddress`, ...). A candidate that fails its
type's rules is tried against the lower-priority types at the same position, so an invalid SSN
can still be a valid phone number. Custom regexes run as one extra pass each, on RE2 (a
linear-time engine): they come from policy files, and under Python's backtracking `re` one such
pattern (`(a+)+$`) held the reader for seconds on a 25-byte request. RE2 has no lookarounds and
no backreferences; `compile_custom` refuses patterns that need them.

Raw values never leave this module: a match or finding carries the type, the position, a short
redacted hint (`j***@e***.com`, `***-**-6789`, `************1111`) and a keyed fingerprint
(HMAC-SHA256 under a per-agent secret, truncated), so repeated values can be counted without
being stored. Paths that would include a JSON key or header name holding PII use the key's
redacted form.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import re2  # type: ignore[import-untyped]

from infertap.agent.inspect.findings import Finding, Severity
from infertap.agent.models.inference_event import InferenceEvent

EMAIL: Final = "email"
PHONE: Final = "phone"
SSN: Final = "ssn"
CREDIT_CARD: Final = "credit_card"
IBAN: Final = "iban"
IPV4: Final = "ipv4"
IPV6: Final = "ipv6"

# Priority order: at one position the first type whose pattern matches and whose rules pass wins.
BUILTIN_TYPES: Final[tuple[str, ...]] = (EMAIL, IBAN, IPV6, IPV4, CREDIT_CARD, SSN, PHONE)

DEFAULT_SEVERITY: Final[Mapping[str, Severity]] = {
    EMAIL: "warn",
    PHONE: "warn",
    SSN: "alert",
    CREDIT_CARD: "alert",
    IBAN: "alert",
    IPV4: "info",
    IPV6: "info",
}

# Strings longer than this are scanned only up to it: bounds the CPU one request can cost.
DEFAULT_MAX_CHARS: Final = 1 << 20

# --- candidate patterns -------------------------------------------------------------------------
# Each pattern refuses to start or end inside a word or a longer number (the lookarounds), so
# digits inside identifiers, floats and tensors dumped as text are not candidates.

_PATTERNS: Final[Mapping[str, str]] = {
    EMAIL: (
        r"(?<![\w.%+-])[A-Za-z0-9][\w.%+-]{0,63}@"
        r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
    ),
    # Country code, check digits, then up to 30 alphanumerics, optionally in groups of four.
    IBAN: r"(?<!\w)[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]{1,4}){3,8}(?!\w)",
    # Hex groups and colons (at least two colons), optionally an embedded IPv4 tail and a zone.
    IPV6: (
        r"(?<![\w:.])(?=[0-9A-Fa-f]*:[0-9A-Fa-f]*:)[0-9A-Fa-f:]{2,39}"
        r"(?:(?<=:)\d{1,3}(?:\.\d{1,3}){3})?(?:%[\w-]{1,16})?(?![\w:]|\.\d)"
    ),
    IPV4: r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?!\w|\.\d)",
    # 13-19 digits starting 1-6 (the issuer ranges in use), spaces or dashes allowed.
    CREDIT_CARD: r"(?<![\w.,-])[1-6]\d{3}(?:[ -]?\d){9,15}(?!\w|-?\d)",
    SSN: r"(?<![\w.,-])\d{3}(?P<ssn_sep>[- ])\d{2}(?P=ssn_sep)\d{4}(?!\w|-\d)",
    # International (+CC or 00CC, an optional "(0)" trunk), an optional area code in parentheses,
    # digit groups with single separators, and an optional extension. _valid_phone decides.
    PHONE: (
        r"(?<![\w+.,/-])(?:(?:\+|\b00)\d{1,3}[ .-]?(?:\(0\)[ .-]?)?)?(?:\(\d{1,5}\)[ .-]?)?"
        r"\d+(?:[ .-]\d+){0,6}(?:[ ]?(?:x|ext\.?|\#)[ ]?\d{1,6})?(?!\w|[.-]?\d)"
    ),
}

# IBAN lengths per country (SWIFT IBAN registry).
IBAN_LENGTHS: Final[Mapping[str, int]] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18,
    "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}  # fmt: skip

_COMBINED: Final = re.compile("|".join(f"(?P<{t}>{_PATTERNS[t]})" for t in BUILTIN_TYPES))
_SINGLE: Final[Mapping[str, re.Pattern[str]]] = {t: re.compile(p) for t, p in _PATTERNS.items()}
_DIGITS: Final = re.compile(r"\d")
_EXTENSION: Final = re.compile(r"[ ]?(?:x|ext\.?|#)[ ]?\d{1,6}$")
_DATE: Final = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}\b|\d{1,2}[-./]\d{1,2}[-./]\d{4}\b")
_NOT_PHONE: Final = re.compile(r"\d{3}-\d{2}-\d{4}|\d{5}-\d{4}")
_TRIGGER: Final = re.compile(r"[\d@:]")
_TOKEN: Final = re.compile(r"[^\s,;:!?)\]}'\"]*")
_IDENT: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


# --- validators: candidate text -> normalised value (for the fingerprint), or None ---------------


_NUMBER_TYPES: Final = frozenset({CREDIT_CARD, SSN, PHONE})


def _after_digit_group(text: str, pos: int) -> bool:
    """True when `pos` follows a plain group of digits and a space ("4546 8698 3066 0"): a
    card, SSN or phone number starting here would be the tail of a longer run of numbers."""
    if pos < 2 or text[pos - 1] != " " or not text[pos - 2].isdigit():
        return False
    j = pos - 2
    while j > 0 and text[j - 1].isdigit():
        j -= 1
    # A group glued to a letter or number punctuation ("v2", "0.5", "+44") is another token.
    return j == 0 or not (text[j - 1].isalnum() or text[j - 1] in ".,-/:+_")


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _valid_card(s: str) -> str | None:
    seps = {c for c in s if not c.isdigit()}
    if len(seps) > 1:  # "4111 1111-1111 1111" is not how anyone writes a card number
        return None
    digits = "".join(c for c in s if c.isdigit())
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return None
    return digits if _luhn_ok(digits) else None


def _valid_ssn(s: str) -> str | None:
    digits = s[0:3] + s[4:6] + s[7:11]
    area, group, serial = int(s[0:3]), int(s[4:6]), int(s[7:11])
    if area == 0 or area == 666 or area >= 900 or group == 0 or serial == 0:
        return None
    return digits


def _iban_end(s: str) -> int | None:
    """Where the IBAN in candidate `s` ends (the candidate may run on into the next word)."""
    length = IBAN_LENGTHS.get(s[:2])
    if length is None:
        return None
    seen = 0
    for i, ch in enumerate(s):
        if ch != " ":
            seen += 1
            if seen == length:
                end = i + 1
                # The IBAN must end at a group boundary, not in the middle of a run of characters.
                return end if end == len(s) or s[end] == " " else None
    return None


def _valid_iban(s: str) -> str | None:
    compact = s.replace(" ", "")
    if len(compact) != IBAN_LENGTHS.get(compact[:2]):
        return None
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return compact if int(number) % 97 == 1 else None


def _valid_ip4(s: str) -> str | None:
    try:
        ipaddress.IPv4Address(s)
    except ValueError:
        return None
    return s


def _valid_ip6(s: str) -> str | None:
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    return None if addr.is_unspecified else addr.compressed


def _valid_email(s: str) -> str | None:
    local, _, domain = s.rpartition("@")
    if not local or local.endswith(".") or ".." in local or len(domain) > 253:
        return None
    return s.lower()


def _valid_phone(s: str) -> str | None:
    body = _EXTENSION.sub("", s)
    digits = "".join(_DIGITS.findall(body))
    if _NOT_PHONE.fullmatch(body):
        return None  # SSN-shaped (an invalid SSN is still no phone number) or a ZIP+4 code
    # "(0)" is the national trunk prefix written inside an international number: not dialled.
    n = len(digits) - (1 if "(0)" in body else 0)
    if body.startswith("+"):
        return digits if 8 <= n <= 15 else None  # E.164: country code + subscriber, <= 15
    seps = [c for c in body if c in " .-"]
    if not seps and "(" not in body:
        return None  # without "+", a bare run of digits is a number, not a phone number
    if body.startswith("00"):
        return digits if 10 <= n <= 17 else None  # "00" + an E.164 number of at least 8 digits
    if not 9 <= len(digits) <= 12:
        return None
    groups = re.split(r"[ .\-()]+", body.strip("()"))
    groups = [g for g in groups if g]
    if set(seps) == {"."} and [len(g) for g in groups] != [3, 3, 4]:
        return None  # dotted: only the North American 3.3.4 form (not floats, versions, IPs)
    if set(seps) == {" "} and all(len(g) == 3 for g in groups[1:]) and len(groups[0]) <= 3:
        return None  # "12 345 678": a number with thousands separators
    if _DATE.match(body):
        return None  # 2024-01-15, 15.01.2024, 01-15-2024 (and whatever follows them)
    return digits


# --- redaction -----------------------------------------------------------------------------------


def _mask_digits(s: str, keep_last: int) -> str:
    """Replace every digit but the last `keep_last` with '*', keeping separators."""
    total = sum(c.isdigit() for c in s)
    out: list[str] = []
    seen = 0
    for c in s:
        if c.isdigit():
            seen += 1
            out.append(c if seen > total - keep_last else "*")
        else:
            out.append(c)
    return "".join(out)


def _redact(kind: str, raw: str) -> str:
    if kind == EMAIL:
        local, _, domain = raw.rpartition("@")
        labels = domain.split(".")
        return f"{local[:1]}***@{labels[0][:1]}***.{labels[-1]}"
    if kind == SSN:
        return "***-**-" + raw[-4:]
    if kind == CREDIT_CARD:
        return _mask_digits(raw, 4)
    if kind == PHONE:
        return _mask_digits(_EXTENSION.sub("", raw), 2)
    if kind == IBAN:
        compact = raw.replace(" ", "")
        return compact[:2] + "*" * (len(compact) - 6) + compact[-4:]
    if kind == IPV4:
        return raw.split(".", 1)[0] + ".*.*.*"
    if kind == IPV6:
        return "::*" if raw.startswith("::") else raw.split(":", 1)[0] + ":*"
    return f"<{len(raw)} chars>"  # custom types: nothing about the value but its length


# --- custom patterns ----------------------------------------------------------------------------

_RE2_OPTIONS: Final = re2.Options()
_RE2_OPTIONS.log_errors = False  # errors are raised, with the pattern, not printed to stderr


def compile_custom(pattern: str) -> Any:
    """A custom PII regex compiled with RE2: matching time is linear in the text, whatever the
    pattern. Raises ValueError ("bad regex: ...") for a pattern RE2 does not accept, which
    includes lookarounds and backreferences (they need backtracking)."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode("utf-8", "replace") if e.args else str(e)
        raise ValueError(
            f"bad regex: {reason} (custom patterns run on RE2, a linear-time engine: no"
            " lookarounds or backreferences)"
        ) from None


# --- scanner -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PiiMatch:
    """One PII value found in a string: where, what type, and safe forms of it. No raw value."""

    type: str
    start: int
    end: int
    redacted: str
    fingerprint: str


class PiiScanner:
    """Finds PII in text, JSON values, headers and InferenceEvents.

    `secret` keys the fingerprints (HMAC-SHA256); give each agent its own and keep it stable to
    count repeats across restarts. Without one, a random per-process secret is made.
    `custom` maps a type name to a regex (compiled with RE2, see compile_custom); its whole
    match is the value.
    `types` restricts the built-in types scanned (default: all).
    """

    __slots__ = ("_custom", "_key", "_max_chars", "_severity", "_types")

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        custom: Mapping[str, str] | None = None,
        types: Iterable[str] | None = None,
        severity: Mapping[str, Severity] | None = None,
        max_chars: int = DEFAULT_MAX_CHARS,
    ) -> None:
        self._key = secret if secret is not None else secrets.token_bytes(32)
        if not self._key:
            raise ValueError("PII fingerprint secret must not be empty")
        chosen = frozenset(BUILTIN_TYPES if types is None else types)
        unknown = chosen - set(BUILTIN_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types: {', '.join(sorted(unknown))}")
        self._types = chosen
        self._custom: dict[str, Any] = {}  # name -> RE2 pattern
        for name, pattern in (custom or {}).items():
            if name in BUILTIN_TYPES or not _IDENT.fullmatch(name):
                raise ValueError(
                    f"custom PII type name {name!r} is a built-in or not an identifier"
                )
            try:
                self._custom[name] = compile_custom(pattern)
            except ValueError as e:
                raise ValueError(f"custom PII type {name!r}: {e}") from None
        self._severity: dict[str, Severity] = {**DEFAULT_SEVERITY, **(severity or {})}
        self._max_chars = max_chars

    def __repr__(self) -> str:  # never the secret
        return f"PiiScanner(types={sorted(self._types)}, custom={sorted(self._custom)})"

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(t for t in BUILTIN_TYPES if t in self._types) + tuple(self._custom)

    def fingerprint(self, kind: str, normalised: str) -> str:
        """Keyed hash of a normalised value: equal values give equal fingerprints, per secret."""
        mac = hmac.new(self._key, f"{kind}\x00{normalised}".encode(), hashlib.sha256)
        return mac.hexdigest()[:16]

    # -- text --

    def scan_text(self, text: str) -> list[PiiMatch]:
        """Every PII value in `text` (up to max_chars), in order of position."""
        text = text[: self._max_chars]
        out: list[PiiMatch] = []
        # Every built-in type holds a digit, "@" or ":": text with none (most prose) is done in
        # one C-speed search instead of the combined pass.
        if self._types and _TRIGGER.search(text):
            out.extend(self._scan_builtin(text))
        for name, pattern in self._custom.items():
            for m in pattern.finditer(text):
                if m.end() > m.start():
                    raw = m.group(0)
                    out.append(
                        PiiMatch(
                            name,
                            m.start(),
                            m.end(),
                            _redact(name, raw),
                            self.fingerprint(name, raw),
                        )
                    )
        if self._custom:
            out.sort(key=lambda x: (x.start, x.end))
        return out

    def _scan_builtin(self, text: str) -> Iterator[PiiMatch]:
        pos = 0
        while (m := _COMBINED.search(text, pos)) is not None:
            kind = m.lastgroup
            assert kind is not None
            found = self._validate_at(text, m.start(), BUILTIN_TYPES.index(kind))
            if found is not None:
                yield found
                pos = found.end
            else:
                # The rejected candidate may have swallowed a real value after it ("0.5 123-45-
                # 6789"): search again from the next position; the lookbehinds keep that cheap.
                pos = m.start() + 1

    def _validate_at(self, text: str, pos: int, first: int) -> PiiMatch | None:
        in_digit_run = _after_digit_group(text, pos)
        for kind in BUILTIN_TYPES[first:]:
            if kind not in self._types or (in_digit_run and kind in _NUMBER_TYPES):
                continue
            m = _SINGLE[kind].match(text, pos)
            if m is None:
                continue
            raw = m.group(0)
            if kind == IBAN:  # the candidate may run on into a following word: cut it to length
                cut = _iban_end(raw)
                if cut is None:
                    continue
                raw = raw[:cut]
            validate = _VALIDATORS[kind]
            norm = validate(raw)
            if norm is None and kind in (CREDIT_CARD, PHONE):
                # Digit groups run on across spaces into the next token ("4111 1111 1111 1111
                # 12/27", "415-555-2671 0.5"): try the candidate cut at a space, longest first,
                # but only before a token of another shape (a plain number may be one more group).
                for cut in (i for i in range(len(raw) - 1, 0, -1) if raw[i] == " "):
                    nxt = _TOKEN.match(text, pos + cut + 1)
                    if nxt is not None and nxt.group(0).isdigit():
                        continue
                    if _SINGLE[kind].fullmatch(text, pos, pos + cut):
                        norm = validate(raw[:cut])
                        if norm is not None:
                            raw = raw[:cut]
                            break
            if norm is not None:
                end = pos + len(raw)
                return PiiMatch(kind, pos, end, _redact(kind, raw), self.fingerprint(kind, norm))
        return None

    def redact_text(self, text: str) -> str:
        """`text` with every PII value replaced by its redacted hint (for logs and paths)."""
        matches = self.scan_text(text)
        if not matches:
            return text[: self._max_chars]
        parts: list[str] = []
        pos = 0
        for m in matches:
            if m.start < pos:
                continue  # overlapping custom match: the first one already covers it
            parts.append(text[pos : m.start])
            parts.append(f"<{m.type}:{m.redacted}>")
            pos = m.end
        parts.append(text[pos : self._max_chars])
        return "".join(parts)

    # -- findings --

    def _findings(self, matches: Iterable[PiiMatch], model: str, location: str) -> list[Finding]:
        return [
            Finding(
                kind="pii",
                model=model,
                type=m.type,
                location=location,
                severity=self._severity.get(m.type, "warn"),
                redacted=m.redacted,
                message=f"{m.type} in {location}",
                fingerprint=m.fingerprint,
            )
            for m in matches
        ]

    def scan_text_findings(self, text: str, model: str, location: str) -> list[Finding]:
        return self._findings(self.scan_text(text), model, location)

    def scan_json(self, value: Any, model: str, root: str = "$") -> list[Finding]:
        """Findings for every string (and object key) in a decoded JSON value, by JSON path.

        Numbers are not scanned: they are tensor data, and a number that happens to pass Luhn
        or look like a phone number is noise. Walks with an explicit stack (no recursion limit).
        """
        out: list[Finding] = []
        stack: list[tuple[str, Any]] = [(root, value)]
        while stack:
            path, v = stack.pop()
            if isinstance(v, str):
                out.extend(self.scan_text_findings(v, model, path))
            elif isinstance(v, bytes | bytearray):
                text = bytes(v).decode("utf-8", errors="replace")
                out.extend(self.scan_text_findings(text, model, path))
            elif isinstance(v, Mapping):
                items = list(v.items())
                for k, child in reversed(items):
                    key = str(k)
                    key_matches = self.scan_text(key)
                    child_path = path + self._key_component(key, key_matches)
                    if key_matches:
                        out.extend(self._findings(key_matches, model, child_path))
                    stack.append((child_path, child))
            elif isinstance(v, list | tuple):
                for i in range(len(v) - 1, -1, -1):
                    stack.append((f"{path}[{i}]", v[i]))
        return out

    def _key_component(self, key: str, matches: list[PiiMatch]) -> str:
        if matches:
            key = self.redact_text(key)
        if _IDENT.fullmatch(key):
            return "." + key
        escaped = key.replace("\\", "\\\\").replace("'", "\\'")
        return f"['{escaped}']"

    def scan_headers(
        self,
        headers: Iterable[tuple[str | bytes, str | bytes]] | Mapping[str, str],
        model: str,
    ) -> list[Finding]:
        """Findings in header values, located by (lower-case) header name."""
        pairs = headers.items() if isinstance(headers, Mapping) else headers
        out: list[Finding] = []
        for name, value in pairs:
            n = name.decode("latin-1") if isinstance(name, bytes) else name
            v = value.decode("latin-1") if isinstance(value, bytes) else value
            n = n.lower()
            name_matches = self.scan_text(n)
            if name_matches:
                n = self.redact_text(n)
                out.extend(self._findings(name_matches, model, n))
            out.extend(self.scan_text_findings(v, model, n))
        return out

    def scan_event(self, event: InferenceEvent) -> list[Finding]:
        """Findings in an event's free text, string tensors (inputs and outputs) and parameters.

        Numeric tensors are skipped (see scan_json). A string tensor element is located as
        `$.inputs.<name>[i][j]`.
        """
        model = event.model
        out: list[Finding] = []
        for i, text in enumerate(event.texts):
            out.extend(self.scan_text_findings(text, model, f"$.texts[{i}]"))
        for i, text in enumerate(event.output_texts):
            out.extend(self.scan_text_findings(text, model, f"$.output_texts[{i}]"))
        for side, tensors in (("inputs", event.inputs), ("outputs", event.outputs)):
            for name, arr in tensors.items():
                if np.asarray(arr).dtype.kind not in "OSU":
                    continue  # numbers: no string elements, so nothing to find or locate
                base = f"$.{side}" + self._key_component(name, self.scan_text(name))
                for index, text in _string_elements(arr):
                    loc = base + "".join(f"[{i}]" for i in index)
                    out.extend(self.scan_text_findings(text, model, loc))
        if event.parameters:
            out.extend(self.scan_json(event.parameters, model, "$.parameters"))
        return out


def _string_elements(arr: Any) -> Iterator[tuple[tuple[int, ...], str]]:
    """(index, text) of each str/bytes element of a string or object tensor; nothing otherwise."""
    a = np.asarray(arr)
    if a.dtype.kind not in "OSU":
        return
    for index, v in np.ndenumerate(a):
        if isinstance(v, str):
            yield tuple(int(i) for i in index), v
        elif isinstance(v, bytes | bytearray | np.bytes_):
            yield tuple(int(i) for i in index), bytes(v).decode("utf-8", errors="replace")


_VALIDATORS: Final[Mapping[str, Callable[[str], str | None]]] = {
    EMAIL: _valid_email,
    IBAN: _valid_iban,
    IPV6: _valid_ip6,
    IPV4: _valid_ip4,
    CREDIT_CARD: _valid_card,
    SSN: _valid_ssn,
    PHONE: _valid_phone,
}
