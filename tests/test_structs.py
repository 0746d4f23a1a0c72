"""The Python mirrors of bpf/infertap.h have the C layout: sizes and every field offset."""

from __future__ import annotations

import ctypes as ct
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from infertap.agent.kernel import structs


def _c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a program that prints sizeof/offsetof for every mirrored struct and field."""
    lines = []
    for cname, mirror in structs.MIRRORS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in mirror._fields_:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n"
        f'#include "{structs.HEADER}"\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_python_mirrors_match_c_sizes_and_offsets(tmp_path: Path) -> None:
    c = _c_layout(tmp_path)
    for cname, mirror in structs.MIRRORS.items():
        assert ct.sizeof(mirror) == c[cname], cname
        for fname, *_ in mirror._fields_:
            assert getattr(mirror, fname).offset == c[f"{cname}.{fname}"], f"{cname}.{fname}"


def test_python_constants_match_c_defines() -> None:
    text = structs.HEADER.read_text()
    defines = {m[1]: int(m[2]) for m in re.finditer(r"#define (ITAP_\w+) (\d+)", text)}
    assert defines["ITAP_SAMPLE_MAX"] == structs.SAMPLE_MAX
    assert defines["ITAP_MAX_RINGS"] == structs.MAX_RINGS
    assert defines["ITAP_SAMPLE_MEDIUM"] == structs.SAMPLE_MEDIUM
    assert defines["ITAP_SAMPLE_SMALL"] == structs.SAMPLE_SMALL
    assert defines["ITAP_REC_SAMPLE"] == structs.REC_SAMPLE
    assert defines["ITAP_REC_FLOW_START"] == structs.REC_FLOW_START
    assert defines["ITAP_REC_FLOW_END"] == structs.REC_FLOW_END
    assert defines["ITAP_REC_FLOW_CGROUP"] == structs.REC_FLOW_CGROUP
    assert defines["ITAP_ROLE_CLIENT"] == structs.ROLE_CLIENT
    assert defines["ITAP_ROLE_SERVER"] == structs.ROLE_SERVER
    assert defines["ITAP_SAMPLE_TRUNCATED"] == structs.SAMPLE_TRUNCATED
    assert defines["ITAP_SAMPLE_PULL_FAILED"] == structs.SAMPLE_PULL_FAILED
    assert defines["ITAP_SAMPLE_TLS"] == structs.SAMPLE_TLS
    assert defines["ITAP_SAMPLE_TLS_RECEIVED"] == structs.SAMPLE_TLS_RECEIVED
    tls = {k: v for k, v in defines.items() if k.startswith("ITAP_TLS_STAT_")}
    assert tls.pop("ITAP_TLS_STAT_COUNT") == len(structs.TLS_STAT_NAMES)
    tls_names = [
        k.removeprefix("ITAP_TLS_STAT_").lower()
        for k, _ in sorted(tls.items(), key=lambda kv: kv[1])
    ]
    assert tls_names == list(structs.TLS_STAT_NAMES)
    assert defines["ITAP_VERDICT_BLOCK"] == structs.VERDICT_BLOCK
    assert defines["ITAP_CAPTURE_SKB"] == structs.CAPTURE_SKB
    assert defines["ITAP_CAPTURE_SK_MSG"] == structs.CAPTURE_SK_MSG
    assert defines["ITAP_SOCKHASH_NONE"] == structs.SOCKHASH_NONE
    assert defines["ITAP_SOCKHASH_ALWAYS"] == structs.SOCKHASH_ALWAYS
    assert defines["ITAP_SOCKHASH_VERDICT"] == structs.SOCKHASH_VERDICT
    assert defines["ITAP_ACCEL_UNDECIDED"] == structs.ACCEL_UNDECIDED
    assert defines["ITAP_ACCEL_YES"] == structs.ACCEL_YES
    assert defines["ITAP_ACCEL_NO"] == structs.ACCEL_NO
    assert defines["ITAP_H2_UNKNOWN"] == structs.H2_UNKNOWN
    assert defines["ITAP_H2_WALK"] == structs.H2_WALK
    assert defines["ITAP_H2_NO"] == structs.H2_NO
    assert defines["ITAP_STEER_MAX_BACKENDS"] == structs.STEER_MAX_BACKENDS
    steer = {k: v for k, v in defines.items() if k.startswith("ITAP_STEER_STAT_")}
    assert steer.pop("ITAP_STEER_STAT_COUNT") == len(structs.STEER_STAT_NAMES)
    steer_names = [
        k.removeprefix("ITAP_STEER_STAT_").lower()
        for k, _ in sorted(steer.items(), key=lambda kv: kv[1])
    ]
    assert steer_names == list(structs.STEER_STAT_NAMES)
    stat_defines = {k: v for k, v in defines.items() if k.startswith("ITAP_STAT_")}
    assert stat_defines.pop("ITAP_STAT_COUNT") == len(structs.STAT_NAMES)
    by_index = sorted(stat_defines.items(), key=lambda kv: kv[1])
    assert [k.removeprefix("ITAP_STAT_").lower() for k, _ in by_index] == list(structs.STAT_NAMES)
