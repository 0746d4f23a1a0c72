"""Header discovery, cgroup2 discovery, BTF offsets and the instance registry, on fake trees
or against independent tools."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from infertap.agent.kernel import btf, cgroups, headers
from infertap.agent.kernel.instances import InstanceRegistry


def fake_headers(root: Path, version: str) -> None:
    flav = root / f"linux-headers-{version}-amd64"
    common = root / f"linux-headers-{version}-common"
    (flav / "include" / "generated").mkdir(parents=True)
    (flav / "include" / "generated" / "autoconf.h").write_text("")
    (common / "include" / "linux").mkdir(parents=True)
    (common / "include" / "linux" / "kconfig.h").write_text("")
    (common / "arch" / "x86").mkdir(parents=True)


def test_closest_older_headers_are_merged_into_one_tree(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for v in ("5.10.0-30", "6.1.0-56", "6.12.0-1"):
        fake_headers(src, v)
    tree = headers.find_headers(
        "6.8.0-fc", modules_root=tmp_path / "mods", src_root=src, runtime_dir=tmp_path / "run"
    )
    assert tree.origin == "linux-headers-6.1.0-56-amd64"
    assert (tree.path / "include" / "linux" / "kconfig.h").is_file()  # from -common
    assert (tree.path / "include" / "generated" / "autoconf.h").is_file()  # from -amd64


def test_newer_headers_are_used_only_when_no_older_exist(tmp_path: Path) -> None:
    fake_headers(tmp_path / "src", "6.12.0-1")
    tree = headers.find_headers(
        "6.1.0",
        modules_root=tmp_path / "m",
        src_root=tmp_path / "src",
        runtime_dir=tmp_path / "run",
    )
    assert tree.origin == "linux-headers-6.12.0-1-amd64"


def test_the_running_kernels_own_headers_win(tmp_path: Path) -> None:
    own = tmp_path / "mods" / "6.1.0" / "build" / "include" / "linux"
    own.mkdir(parents=True)
    (own / "kconfig.h").write_text("")
    tree = headers.find_headers(
        "6.1.0",
        modules_root=tmp_path / "mods",
        src_root=tmp_path / "s",
        runtime_dir=tmp_path / "run",
    )
    assert tree.origin == "running kernel"


def test_no_headers_names_the_package_to_install(tmp_path: Path) -> None:
    with pytest.raises(headers.HeadersNotFound, match="linux-headers-amd64"):
        headers.find_headers(
            "6.1.0", modules_root=tmp_path, src_root=tmp_path / "none", runtime_dir=tmp_path / "run"
        )


def test_cgroup2_mount_is_read_from_mountinfo(tmp_path: Path) -> None:
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "25 30 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
        "41 25 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroups.cgroup2_mount(mi) == Path("/sys/fs/cgroup/unified")
    mi.write_text("25 30 0:22 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n")
    with pytest.raises(cgroups.CgroupError, match="cgroup v2"):
        cgroups.cgroup2_mount(mi)


def test_cgroup_paths_resolve_under_the_mount_only(tmp_path: Path) -> None:
    (tmp_path / "pod1").mkdir()
    (tmp_path / "pod1" / "cgroup.procs").write_text("")
    (tmp_path / "cgroup.procs").write_text("")
    assert cgroups.resolve("/pod1", tmp_path) == tmp_path / "pod1"
    assert cgroups.resolve(tmp_path / "pod1", tmp_path) == tmp_path / "pod1"
    assert cgroups.resolve("/", tmp_path) == tmp_path
    with pytest.raises(cgroups.CgroupError, match="outside"):
        cgroups.resolve("/../../etc", tmp_path)
    with pytest.raises(cgroups.CgroupError, match="does not exist"):
        cgroups.resolve("/pod2", tmp_path)


@pytest.mark.skipif(
    not btf.VMLINUX_BTF.exists() or shutil.which("bpftool") is None,
    reason="needs kernel BTF and bpftool",
)
def test_btf_offsets_agree_with_bpftool() -> None:
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(btf.VMLINUX_BTF)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    types = json.loads(out)["types"]
    tcp_sock = next(t for t in types if t.get("kind") == "STRUCT" and t.get("name") == "tcp_sock")
    members = {m["name"]: m["bits_offset"] // 8 for m in tcp_sock["members"]}
    for name in ("write_seq", "snd_nxt", "snd_una"):
        assert btf.member_offset("tcp_sock", name) == members[name]
    with pytest.raises(btf.BtfError):
        btf.member_offset("tcp_sock", "no_such_member")


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b'{"pid": 1, "prog_ids": [41, 42]}')
print("locked", flush=True)
time.sleep(60)
"""


def test_registry_tells_live_agents_from_dead_ones(tmp_path: Path) -> None:
    reg = InstanceRegistry(tmp_path)
    reg.register([1, 2])
    (tmp_path / "instances" / "999999.json").write_text('{"pid": 999999, "prog_ids": [7]}')
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path / "instances" / "5.json")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        assert reg.live_prog_ids() == {41, 42}  # the live one; never the dead one's 7
        assert reg.remove_dead() == 1
        assert not (tmp_path / "instances" / "999999.json").exists()
        holder.kill()
        holder.wait()
        assert reg.live_prog_ids() == set()  # the kernel dropped its lock with the process
        assert reg.remove_dead() == 1
    finally:
        holder.kill()
        reg.unregister()
    assert list((tmp_path / "instances").iterdir()) == []
