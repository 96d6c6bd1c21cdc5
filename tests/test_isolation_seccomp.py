"""The hand-built seccomp program, checked by running it in a small BPF interpreter.

Running it for real inside bwrap is in test_isolation_sandbox.py.
"""

from __future__ import annotations

import errno
import re
import struct
from pathlib import Path

import pytest

from corral.drivers.local import seccomp
from corral.drivers.local.seccomp import (
    AUDIT_ARCH,
    SECCOMP_RET_ALLOW,
    SECCOMP_RET_ERRNO,
    SECCOMP_RET_KILL_PROCESS,
    SYSCALLS,
    Insn,
    assemble,
    build_filter,
)
from corral.errors import Unsupported

EPERM = SECCOMP_RET_ERRNO | errno.EPERM
ENOSYS = SECCOMP_RET_ERRNO | errno.ENOSYS
ALLOW = SECCOMP_RET_ALLOW
I386 = 0x40000003
CLONE_THREAD_FLAGS = 0x3D0F00  # what glibc's pthread_create passes to clone
CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
SIGCHLD = 17


def run_bpf(prog: bytes, nr: int, arch: int, args: tuple[int, ...] = ()) -> int:
    """Evaluate a packed classic-BPF seccomp program on one struct seccomp_data."""
    full = (*args, *([0] * (6 - len(args))))
    data = struct.pack("<iIQ6Q", nr, arch, 0x1000, *full)
    insns = list(struct.iter_unpack("=HBBI", prog))
    acc = 0
    pc = 0
    for _ in range(len(insns) + 1):  # classic BPF only jumps forward
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld [k]
            assert k % 4 == 0 and k + 4 <= len(data)
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code == 0x15:  # jeq
            pc += 1 + (jt if acc == k else jf)
        elif code == 0x35:  # jge
            pc += 1 + (jt if acc >= k else jf)
        elif code == 0x45:  # jset
            pc += 1 + (jt if acc & k else jf)
        elif code == 0x06:  # ret k
            return int(k)
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
    raise AssertionError("program did not return")


def nr(arch: str, name: str) -> int:
    return SYSCALLS[arch][name]


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_packing_is_sock_filter_array(arch: str) -> None:
    prog = build_filter(arch)
    assert len(prog) % 8 == 0
    assert 0 < len(prog) // 8 <= 4096
    # every instruction is one of the five opcodes the interpreter knows
    codes = {code for code, *_ in struct.iter_unpack("=HBBI", prog)}
    assert codes <= {0x20, 0x15, 0x35, 0x45, 0x06}
    # the last instruction returns (the kernel's checker requires it)
    assert struct.unpack("=HBBI", prog[-8:])[0] == 0x06


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_every_denied_syscall_gets_eperm(arch: str) -> None:
    prog = build_filter(arch)
    audit = AUDIT_ARCH[arch]
    denied = [name for name in seccomp.DENY if name in SYSCALLS[arch]]
    assert len(denied) >= 40
    for name in denied:
        assert run_bpf(prog, nr(arch, name), audit) == EPERM, name


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ordinary_syscalls_are_allowed(arch: str) -> None:
    prog = build_filter(arch)
    audit = AUDIT_ARCH[arch]
    special = set(SYSCALLS[arch].values())
    for number in range(460):
        if number not in special:
            assert run_bpf(prog, number, audit) == ALLOW, number


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_foreign_arch_is_killed(arch: str) -> None:
    prog = build_filter(arch)
    other = next(value for key, value in AUDIT_ARCH.items() if key != arch)
    for audit in (I386, other, 0):
        assert run_bpf(prog, 0, audit) == SECCOMP_RET_KILL_PROCESS
        assert run_bpf(prog, nr(arch, "ptrace"), audit) == SECCOMP_RET_KILL_PROCESS


def test_x32_syscalls_get_enosys_on_x86_64() -> None:
    prog = build_filter("x86_64")
    audit = AUDIT_ARCH["x86_64"]
    getpid = 39
    assert run_bpf(prog, getpid, audit) == ALLOW
    assert run_bpf(prog, 0x40000000 | getpid, audit) == ENOSYS
    assert run_bpf(prog, 0x40000000 | nr("x86_64", "ptrace"), audit) == ENOSYS


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_clone3_enosys_and_clone_namespace_flags(arch: str) -> None:
    prog = build_filter(arch)
    audit = AUDIT_ARCH[arch]
    clone = nr(arch, "clone")
    assert run_bpf(prog, nr(arch, "clone3"), audit, (0x1234, 88)) == ENOSYS
    assert run_bpf(prog, clone, audit, (SIGCHLD,)) == ALLOW  # fork()
    assert run_bpf(prog, clone, audit, (CLONE_THREAD_FLAGS,)) == ALLOW  # threads
    for bit in (0x00020000, 0x02000000, 0x04000000, 0x08000000, CLONE_NEWUSER, 0x20000000):
        assert run_bpf(prog, clone, audit, (bit | SIGCHLD,)) == EPERM, hex(bit)
    assert run_bpf(prog, clone, audit, (CLONE_NEWNET | CLONE_THREAD_FLAGS,)) == EPERM


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_personality_only_linux_and_query(arch: str) -> None:
    prog = build_filter(arch)
    audit = AUDIT_ARCH[arch]
    call = nr(arch, "personality")
    assert run_bpf(prog, call, audit, (0,)) == ALLOW
    assert run_bpf(prog, call, audit, (0xFFFFFFFF,)) == ALLOW
    assert run_bpf(prog, call, audit, (0xFFFFFFFF_FFFFFFFF,)) == ALLOW  # -1 as a long
    for persona in (0x0040000, 0x0400000, 0x0008, 0x0020000):  # ADDR_NO_RANDOMIZE, ...
        assert run_bpf(prog, call, audit, (persona,)) == EPERM, hex(persona)


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_ioctl_tiocsti_and_tioclinux_only(arch: str) -> None:
    prog = build_filter(arch)
    audit = AUDIT_ARCH[arch]
    call = nr(arch, "ioctl")
    assert run_bpf(prog, call, audit, (0, 0x5412)) == EPERM  # TIOCSTI
    assert run_bpf(prog, call, audit, (5, 0x541C)) == EPERM  # TIOCLINUX
    # the kernel truncates cmd to 32 bits, so high bits must not slip past
    assert run_bpf(prog, call, audit, (0, 0x1_0000_5412)) == EPERM
    assert run_bpf(prog, call, audit, (0, 0x5401)) == ALLOW  # TCGETS
    assert run_bpf(prog, call, audit, (0x5412, 0x5413)) == ALLOW  # fd is not the cmd


def _header_numbers(path: Path, names: list[str]) -> dict[str, int]:
    text = path.read_text()
    found: dict[str, int] = {}
    for name in names:
        match = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)\b", text)
        if match:
            found[name] = int(match.group(1))
    return found


@pytest.mark.parametrize(
    ("arch", "header"),
    [
        ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"),
        ("aarch64", "/usr/include/asm-generic/unistd.h"),
    ],
)
def test_numbers_match_kernel_headers(arch: str, header: str) -> None:
    path = Path(header)
    if not path.exists():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    table = SYSCALLS[arch]
    assert _header_numbers(path, list(table)) == dict(table)


def test_host_arch_default_and_unknown_arch() -> None:
    assert build_filter() == build_filter(seccomp.host_arch())
    with pytest.raises(Unsupported):
        build_filter("riscv64")


def test_assembler_rejects_bad_jumps() -> None:
    with pytest.raises(ValueError, match="unknown label"):
        assemble([Insn(0x15, 1, jt="nowhere")])
    with pytest.raises(ValueError, match="out of range"):
        assemble([Insn(0x15, 1, jt="far"), *[Insn(0x06)] * 300, "far", Insn(0x06)])
    with pytest.raises(ValueError, match="duplicate"):
        assemble(["a", Insn(0x06), "a", Insn(0x06)])
    assert assemble([Insn(0x15, 7, jt="x"), Insn(0x06, 1), "x", Insn(0x06, 2)]) == [
        (0x15, 1, 0, 7),
        (0x06, 0, 0, 1),
        (0x06, 0, 0, 2),
    ]
