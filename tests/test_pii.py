"""PII detection: precision and recall per type on a Faker corpus plus hand-picked invalid values,
no raw value in any finding, JSON paths, headers, events, fingerprints, custom types, speed."""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
import pytest
from faker import Faker

from infertap.agent.flows.records import Endpoint
from infertap.agent.inspect.findings import Finding
from infertap.agent.inspect.pii import BUILTIN_TYPES, PiiScanner
from infertap.agent.models.inference_event import InferenceEvent

SECRET = b"test-agent-secret"
FLOOR = 0.95  # precision and recall floor for every built-in type
N = 250  # positives per type

TEMPLATES = [
    "{}",
    "Customer note: {} - please follow up.",
    "contact={};status=open",
    '{{"field": "{}"}}',
    "Reach me at {}, thanks!",
    "({})",
]


def _fakers() -> dict[str, Faker]:
    out = {}
    for i, loc in enumerate(["en_US", "en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"]):
        f = Faker(loc)
        f.seed_instance(1000 + i)
        out[loc] = f
    return out


def _group4(s: str, sep: str) -> str:
    return sep.join(s[i : i + 4] for i in range(0, len(s), 4))


def corpus() -> list[tuple[str, str | None]]:
    """(value, type) pairs; type None for values that are not PII of any built-in type."""
    rnd = random.Random(7)
    fk = _fakers()
    us = fk["en_US"]
    items: list[tuple[str, str | None]] = []

    # email
    for i in range(N):
        f = fk[["en_US", "en_GB", "de_DE", "fr_FR"][i % 4]]
        items.append(([f.email, f.free_email, f.company_email][i % 3](), "email"))
    # phone: national formats of five locales, plus E.164. A bare run of digits is deliberately
    # not a phone number (it is what numeric data looks like), so such Faker outputs are left out.
    phones: list[str] = []
    while len(phones) < N * 3 // 4:
        f = fk[["en_US", "en_GB", "fr_FR", "de_DE", "nl_NL"][len(phones) % 5]]
        p = f.phone_number()
        if not re.fullmatch(r"\d+", p):
            phones.append(p)
    for _ in range(N - len(phones)):
        cc = rnd.choice(["1", "44", "49", "33", "31", "34", "39", "61", "81", "91", "353"])
        phones.append(
            "+" + cc + "".join(rnd.choice("0123456789") for _ in range(rnd.randint(8, 10)))
        )
    items += [(p, "phone") for p in phones]
    # ssn (Faker's en_US SSNs are in the valid ranges)
    items += [(us.ssn(), "ssn") for _ in range(N)]
    # credit cards, 13-19 digits, plain or grouped by four with spaces or dashes
    kinds = [
        "visa13",
        "visa16",
        "visa19",
        "mastercard",
        "amex",
        "discover",
        "diners",
        "jcb15",
        "jcb16",
    ]
    for i in range(N):
        num = us.credit_card_number(kinds[i % len(kinds)])
        items.append(
            (num if i % 3 == 0 else _group4(num, " " if i % 3 == 1 else "-"), "credit_card")
        )
    # IBAN, compact or in groups of four
    for i in range(N):
        f = fk[["en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"][i % 6]]
        iban = f.iban()
        items.append((iban if i % 2 else _group4(iban, " "), "iban"))
    # IP addresses
    items += [([us.ipv4, us.ipv4_private, us.ipv4_public][i % 3](), "ipv4") for i in range(N)]
    items += [(us.ipv6(), "ipv6") for _ in range(N)]

    # --- negatives ---
    neg: list[str] = []
    # Luhn-failing cards: a valid number with its check digit changed.
    for i in range(60):
        num = us.credit_card_number(kinds[i % len(kinds)])
        bad = num[:-1] + str((int(num[-1]) + 1 + i % 9) % 10)
        neg.append(bad if i % 2 else _group4(bad, " "))
    # SSNs in the invalid ranges: Faker's invalid_ssn plus the edges of each rule.
    neg += [us.invalid_ssn() for _ in range(40)]
    neg += [
        "000-12-3456",
        "666-12-3456",
        "900-12-3456",
        "999-99-9999",
        "123-00-4567",
        "123-45-0000",
    ]
    # IBANs with a wrong check (two check digits changed) or a wrong length for the country.
    for i in range(40):
        iban = fk[["en_GB", "de_DE", "fr_FR", "nl_NL"][i % 4]].iban()
        check = (int(iban[2:4]) + 1 + i % 50) % 100
        neg.append(iban[:2] + f"{check:02d}" + iban[4:] if i % 3 else iban[:-1])
    # Broken emails and IPs.
    neg += ["john@", "@example.com", "john@@example.com", "john.example.com", "john@example"]
    neg += ["john..doe@example.com", "a@b.c", "user@-example.com"]
    neg += ["256.1.1.1", "1.2.3", "999.999.999.999", "01.02.03.04", "1.2.3.4.5", "192.168.1"]
    neg += ["12:30:45", "1::2::3", "gggg::1", "::", "2001:db8:::1"]
    # Numbers as numeric data shows them: plain integers, floats, dates, times, versions, ids.
    for _ in range(120):
        neg.append(str(rnd.randint(10_000, 999_999_999_999)))
        neg.append(f"{rnd.uniform(-1e4, 1e4):.6f}")
    neg += [us.date() for _ in range(30)] + [us.time() for _ in range(20)]
    neg += [us.iso8601() for _ in range(20)] + [str(us.uuid4()) for _ in range(30)]
    neg += ["v1.2.3", "3.14159265358979", "1,234,567.89", "12 345 678", "2024-01-15", "10-20-30"]
    neg += [us.sentence() for _ in range(40)]
    # Other numbers people write: barcodes (EAN-13 has its own check digit, so about one in ten
    # also passes Luhn: a real limit of card detection), ISBNs, ZIP+4 codes, prices, durations.
    neg += [us.ean13() for _ in range(40)] + [us.isbn13() for _ in range(20)]
    neg += [us.zipcode_plus4() for _ in range(30)] + [us.pricetag() for _ in range(20)]
    neg += [
        f"{rnd.randint(1, 99)}:{rnd.randint(0, 59):02d}:{rnd.randint(0, 59):02d}" for _ in range(20)
    ]
    items += [(v, None) for v in neg]
    return items


@pytest.fixture(scope="module")
def scanner() -> PiiScanner:
    return PiiScanner(secret=SECRET)


def test_precision_recall_per_type(scanner: PiiScanner) -> None:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    misses: dict[str, list[str]] = {}
    for i, (value, label) in enumerate(corpus()):
        text = TEMPLATES[i % len(TEMPLATES)].format(value)
        found = {m.type for m in scanner.scan_text(text)}
        if label is not None:
            if label in found:
                tp[label] += 1
            else:
                fn[label] += 1
                misses.setdefault(label, []).append(value)
        for t in found - {label}:
            fp[t] += 1
            misses.setdefault(f"fp:{t}", []).append(value)
    print()
    report = {}
    for t in BUILTIN_TYPES:
        precision = tp[t] / max(tp[t] + fp[t], 1)
        recall = tp[t] / max(tp[t] + fn[t], 1)
        report[t] = (precision, recall)
        counts = f"tp {tp[t]} fp {fp[t]} fn {fn[t]}"
        print(f"{t:12s} precision {precision:.3f} recall {recall:.3f}  ({counts})")
    # The wrong ones, redacted, to see what failed without printing PII-shaped test data whole.
    for k, vs in misses.items():
        print(k, [scanner.redact_text(v) if not k.startswith("fp") else len(v) for v in vs[:5]])
    for t, (precision, recall) in report.items():
        assert precision >= FLOOR, f"{t} precision {precision:.3f}"
        assert recall >= FLOOR, f"{t} recall {recall:.3f}"


def _fields(f: Finding) -> list[str]:
    return [repr(f), str(f), *(str(v) for v in asdict(f).values())]


def _leaks(raw: str, f: Finding) -> bool:
    digits = re.sub(r"\D", "", raw)
    compact = raw.replace(" ", "")
    for text in _fields(f):
        if raw in text or compact in text or (len(digits) >= 7 and digits in text):
            return True
    return False


def test_no_raw_value_in_findings(scanner: PiiScanner) -> None:
    """Every way a value reaches a finding: text, JSON value, JSON key, header, tensor element."""
    positives = [(v, t) for v, t in corpus() if t is not None]
    checked = 0
    for value, _ in positives:
        body = {"inputs": [{"name": "q", "data": [f"note {value}"]}], value: 1}
        findings = scanner.scan_json(body, "m")
        findings += scanner.scan_headers([("x-user", value), (value, "v")], "m")
        event = InferenceEvent(
            service=Endpoint("10.0.0.1", 8080),
            model="m",
            version="",
            protocol="kserve-v2-rest",
            ts_ns=0,
            inputs={"text": np.array([value.encode()], dtype=object)},
            texts=[value],
            output_texts=[f"you said {value}"],
        )
        findings += scanner.scan_event(event)
        assert len(findings) >= 6, (scanner.redact_text(value), findings)
        for f in findings:
            assert not _leaks(value, f), f
            checked += 1
        for m in scanner.scan_text(value):
            assert value not in repr(m)
    assert checked > 6 * len(positives)
    assert SECRET.decode() not in repr(scanner)


def test_json_paths_headers_and_event_locations(scanner: PiiScanner) -> None:
    body = {
        "inputs": [
            {"name": "text", "datatype": "BYTES", "data": ["hello", "mail jane.doe@example.com"]},
            {"name": "x", "datatype": "FP32", "data": [4111111111111111, 4155552671]},
        ],
        "parameters": {"user id": "SSN 123-45-6789"},
    }
    got = {(f.type, f.location, f.redacted) for f in scanner.scan_json(body, "fraud")}
    assert got == {
        ("email", "$.inputs[0].data[1]", "j***@e***.com"),
        ("ssn", "$.parameters['user id']", "***-**-6789"),
    }
    hdr = scanner.scan_headers([("X-Forwarded-For", "203.0.113.9"), ("Content-Type", "json")], "m")
    assert [(f.type, f.location, f.redacted) for f in hdr] == [
        ("ipv4", "x-forwarded-for", "203.*.*.*")
    ]
    event = InferenceEvent(
        service=Endpoint("10.0.0.1", 8080),
        model="fraud",
        version="1",
        protocol="kserve-v2-rest",
        ts_ns=0,
        inputs={
            "prompt": np.array([[b"hi", b"card 4111-1111-1111-1111"]], dtype=object),
            "amount": np.array([4111111111111111.0, 4155552671.0]),  # numbers: never scanned
        },
        outputs={"label": np.array(["call +14155552671"])},
        texts=["IBAN GB82 WEST 1234 5698 7654 32 please"],
    )
    got_e = {(f.type, f.location, f.redacted, f.severity) for f in scanner.scan_event(event)}
    assert got_e == {
        ("iban", "$.texts[0]", "GB****************5432", "alert"),
        ("credit_card", "$.inputs.prompt[0][1]", "****-****-****-1111", "alert"),
        ("phone", "$.outputs.label[0]", "+*********71", "warn"),
    }


def test_fingerprints_count_repeats_without_values() -> None:
    a = PiiScanner(secret=b"one")
    b = PiiScanner(secret=b"two")
    fp1 = a.scan_text("4111 1111 1111 1111")[0].fingerprint
    fp2 = a.scan_text("card 4111-1111-1111-1111!")[0].fingerprint
    fp3 = a.scan_text("4111111111111111")[0].fingerprint
    assert fp1 == fp2 == fp3  # the same card however it is written
    assert b.scan_text("4111111111111111")[0].fingerprint != fp1  # per-agent key
    assert a.scan_text("5555555555554444")[0].fingerprint != fp1
    assert (
        a.scan_text("John@Example.com")[0].fingerprint
        == a.scan_text("john@example.com")[0].fingerprint
    )
    texts = ["a@x.com", "b@x.com", "a@x.com", "A@X.COM"]
    counts = Counter(f.fingerprint for t in texts for f in a.scan_text_findings(t, "m", "$"))
    assert sorted(counts.values()) == [1, 3]


def test_validation_rules_in_detail(scanner: PiiScanner) -> None:
    def types(text: str) -> list[str]:
        return [m.type for m in scanner.scan_text(text)]

    # SSN: every invalid range, and a valid neighbour of each.
    for bad in ["000-12-3456", "666-12-3456", "900-12-3456", "123-00-4567", "123-45-0000"]:
        assert "ssn" not in types(bad), bad
    for good in ["001-12-3456", "665-12-3456", "899-12-3456", "123-01-4567", "123-45-0001"]:
        assert types(good) == ["ssn"], good
    # Cards: Luhn, length bounds, mixed separators, repeated digits.
    assert types("4111111111111111") == ["credit_card"]
    assert types("4111111111111112") == []
    assert types("4222222222222") == ["credit_card"]  # 13 digits
    assert types("411111111111") == []  # 12 digits
    assert types("4111 1111-1111 1111") == []
    assert types("0000000000000000") == []
    # IBAN: checksum, per-country length, trailing word not swallowed.
    assert types("DE89370400440532013000") == ["iban"]
    assert types("DE88370400440532013000") == []
    assert types("DE8937040044053201300") == []  # one short for DE
    m = scanner.scan_text("DE89 3704 0044 0532 0130 00 AB12")[0]
    assert (m.type, m.start, m.end) == ("iban", 0, 27)
    # IPs through ipaddress.
    assert types("10.1.2.3 and 2001:db8::1") == ["ipv4", "ipv6"]
    assert types("300.1.2.3 and 2001:db8::g1") == []
    # Phones: formats yes, bare numbers and dates no.
    assert types("(415) 555-2671") == ["phone"]
    assert types("+44 20 7946 0958") == ["phone"]
    assert types("4155552671") == []
    assert types("2024-01-15 12:30") == []


def test_custom_types_and_errors() -> None:
    s = PiiScanner(secret=SECRET, custom={"employee_id": r"\bEMP-\d{6}\b"}, types=["email"])
    found = [
        (m.type, m.redacted) for m in s.scan_text("EMP-123456 mailed bob@corp.io, 123-45-6789")
    ]
    assert found == [("employee_id", "<10 chars>"), ("email", "b***@c***.io")]
    assert s.redact_text("id EMP-000001") == "id <employee_id:<10 chars>>"
    with pytest.raises(ValueError, match="bad regex"):
        PiiScanner(custom={"x": "("})
    with pytest.raises(ValueError, match=r"bad regex: invalid escape sequence: \\1 \(.*RE2"):
        PiiScanner(custom={"x": r"(a)\1"})  # backreferences need backtracking: refused
    with pytest.raises(ValueError, match="built-in"):
        PiiScanner(custom={"email": "x"})
    with pytest.raises(ValueError, match="unknown PII types"):
        PiiScanner(types=["passport"])


def test_catastrophic_custom_pattern_runs_in_linear_time() -> None:
    """`(a+)+$` on "aaa…a!" backtracks 2^n ways in Python's `re` (25 bytes held the reader
    3.45 s); on RE2 it is one pass. With 64 a's a backtracking engine would never finish and
    pytest-timeout would fail this test."""
    s = PiiScanner(secret=SECRET, custom={"run_of_a": "(a+)+$"}, types=[])
    assert s.scan_text("a" * 64 + "!") == []
    (m,) = s.scan_text("x " + "a" * 64)
    assert (m.type, m.start, m.end, m.redacted) == ("run_of_a", 2, 66, "<64 chars>")
    # Offsets are in characters, not UTF-8 bytes, so redaction cuts text at the right place.
    s2 = PiiScanner(secret=SECRET, custom={"badge": r"EMP-\d{6}"}, types=[])
    assert s2.redact_text("é日本 EMP-123456 ok") == "é日本 <badge:<10 chars>> ok"


def test_scan_speed(scanner: PiiScanner) -> None:
    rnd = random.Random(3)
    fake = Faker("en_US")
    fake.seed_instance(5)
    parts = [fake.paragraph() for _ in range(2000)]
    for i in range(0, len(parts), 20):
        parts[i] += f" {fake.email()} {fake.phone_number()} {rnd.random():.6f} {fake.ssn()}"
    text = " ".join(parts)
    start = time.perf_counter()
    matches = scanner.scan_text(text)
    took = time.perf_counter() - start
    mb_s = len(text) / took / 1e6
    print(f"\nscanned {len(text) / 1e6:.2f} MB in {took * 1000:.0f} ms ({mb_s:.1f} MB/s)")
    injected = len(range(0, len(parts), 20))
    by_type = Counter(m.type for m in matches)
    assert by_type["email"] == by_type["ssn"] == injected
    assert by_type["phone"] >= 0.8 * injected  # en_US also writes bare 10-digit numbers
    assert mb_s > 1.0  # a generous floor for a slow, busy CI machine
