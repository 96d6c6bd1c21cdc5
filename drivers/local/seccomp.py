"""A hand-assembled classic-BPF seccomp filter for ``bwrap --seccomp FD``.

No libseccomp: the program is a list of ``struct sock_filter`` packed with :mod:`struct`
(native endianness, ``u16 code, u8 jt, u8 jf, u32 k``), exactly what the kernel's
``SECCOMP_SET_MODE_FILTER`` takes. bwrap reads it from the fd and installs it right
before it execs the sandbox's command (and in its own pid 1).

What the program does, in order:

1. ``seccomp_data.arch`` must be the host's audit arch (x86_64 or aarch64). Any other
   arch (an i386 or x32 binary trying the other syscall ABI) is ``KILL_PROCESS``:
   the deny list below is only correct for the one numbering it was written for.
2. On x86_64, syscall numbers with the x32 bit (``nr >= 0x40000000``) get ``ENOSYS``,
   as on a kernel built without x32 support: they alias the x86_64 calls under other
   numbers and would walk around the list.
3. The deny list (``DENY``) returns ``EPERM``. The sandbox already runs with no
   capabilities, a read-only root and user namespaces disabled, so most of these fail
   anyway; the filter removes the kernel attack surface behind them and makes the
   answer the same on every host:

   - debugging other processes: ``ptrace``, ``process_vm_readv``/``writev``,
     ``pidfd_getfd``;
   - the mount API, old and new: ``mount``, ``umount2``, ``pivot_root``, ``move_mount``,
     ``open_tree``, ``fsopen``, ``fsconfig``, ``fsmount``, ``fspick``, ``mount_setattr``;
   - namespaces: ``unshare``, ``setns`` (and ``clone`` with ``CLONE_NEW*``, below);
   - the kernel keyring (not namespaced): ``keyctl``, ``add_key``, ``request_key``;
   - large, often-exploited kernel surfaces: ``bpf``, ``perf_event_open``,
     ``userfaultfd``, ``io_uring_setup``/``enter``/``register``;
   - the machine itself: ``kexec_load``, ``kexec_file_load``, ``init_module``,
     ``finit_module``, ``delete_module``, ``reboot``, ``swapon``, ``swapoff``, ``acct``,
     ``quotactl``, ``quotactl_fd``, ``syslog``, ``lookup_dcookie``, ``iopl``, ``ioperm``
     (x86 only);
   - ``open_by_handle_at``: opens files by handle, bypassing path checks (the
     "shocker" container escape);
   - the clock (not namespaced): ``settimeofday``, ``clock_settime``,
     ``clock_adjtime``, ``adjtimex``.
4. Argument checks (only the low 32 bits are looked at, which is what the kernel uses
   for these ``unsigned int`` arguments, so setting high bits does not slip past):

   - ``clone3`` returns ``ENOSYS``: its flags live in a struct that BPF cannot read.
     glibc (2.34+) tries ``clone3`` for threads and falls back to ``clone`` on ENOSYS.
   - ``clone`` with any ``CLONE_NEW*`` bit in its flags (arg 0 on both arches) is
     ``EPERM``; plain fork/thread clones pass.
   - ``personality``: only ``PER_LINUX`` (0) and the query ``0xffffffff`` are allowed,
     others (``ADDR_NO_RANDOMIZE``, ``READ_IMPLIES_EXEC``, ...) get ``EPERM``.
   - ``ioctl`` with ``TIOCSTI`` (push input into a terminal) or ``TIOCLINUX`` is
     ``EPERM``; bwrap's ``--new-session`` already shields the caller's terminal.
5. Everything else is allowed.
"""

from __future__ import annotations

import errno
import functools
import platform
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from corral.errors import Unsupported

__all__ = [
    "ARCHES",
    "AUDIT_ARCH",
    "CLONE_NEW_MASK",
    "DENY",
    "SECCOMP_RET_ALLOW",
    "SECCOMP_RET_ERRNO",
    "SECCOMP_RET_KILL_PROCESS",
    "SYSCALLS",
    "TIOCLINUX",
    "TIOCSTI",
    "X32_SYSCALL_BIT",
    "Insn",
    "assemble",
    "build_filter",
    "host_arch",
    "program",
]

# classic BPF opcodes (linux/filter.h, linux/bpf_common.h)
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JMP_JEQ_K = 0x05 | 0x10 | 0x00  # BPF_JMP | BPF_JEQ | BPF_K
BPF_JMP_JGE_K = 0x05 | 0x30 | 0x00  # BPF_JMP | BPF_JGE | BPF_K
BPF_JMP_JSET_K = 0x05 | 0x40 | 0x00  # BPF_JMP | BPF_JSET | BPF_K
BPF_RET_K = 0x06 | 0x00  # BPF_RET | BPF_K

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}
ARCHES = tuple(AUDIT_ARCH)
X32_SYSCALL_BIT = 0x40000000

# offsets in struct seccomp_data {int nr; u32 arch; u64 ip; u64 args[6];}
OFF_NR = 0
OFF_ARCH = 4


def _arg_lo(index: int) -> int:
    """Offset of the low 32 bits of args[index] (both supported arches are little-endian)."""
    return 16 + 8 * index


# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET. (CLONE_NEWTIME,
# 0x80, is part of clone()'s exit-signal byte and only reachable through clone3/unshare.)
CLONE_NEW_MASK = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
CLONE_NEW_MASK |= 0x20000000 | 0x40000000

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
PER_LINUX = 0
PER_QUERY = 0xFFFFFFFF

# Syscall numbers: x86_64 from asm/unistd_64.h, aarch64 from asm-generic/unistd.h.
SYSCALLS: Mapping[str, Mapping[str, int]] = {
    "x86_64": {
        "ptrace": 101,
        "process_vm_readv": 310,
        "process_vm_writev": 311,
        "pidfd_getfd": 438,
        "mount": 165,
        "umount2": 166,
        "pivot_root": 155,
        "move_mount": 429,
        "open_tree": 428,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "unshare": 272,
        "setns": 308,
        "keyctl": 250,
        "add_key": 248,
        "request_key": 249,
        "bpf": 321,
        "perf_event_open": 298,
        "userfaultfd": 323,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "kexec_load": 246,
        "kexec_file_load": 320,
        "init_module": 175,
        "finit_module": 313,
        "delete_module": 176,
        "reboot": 169,
        "swapon": 167,
        "swapoff": 168,
        "acct": 163,
        "quotactl": 179,
        "quotactl_fd": 443,
        "open_by_handle_at": 304,
        "lookup_dcookie": 212,
        "syslog": 103,
        "iopl": 172,
        "ioperm": 173,
        "settimeofday": 164,
        "clock_settime": 227,
        "clock_adjtime": 305,
        "adjtimex": 159,
        "clone": 56,
        "clone3": 435,
        "personality": 135,
        "ioctl": 16,
    },
    "aarch64": {
        "ptrace": 117,
        "process_vm_readv": 270,
        "process_vm_writev": 271,
        "pidfd_getfd": 438,
        "mount": 40,
        "umount2": 39,
        "pivot_root": 41,
        "move_mount": 429,
        "open_tree": 428,
        "fsopen": 430,
        "fsconfig": 431,
        "fsmount": 432,
        "fspick": 433,
        "mount_setattr": 442,
        "unshare": 97,
        "setns": 268,
        "keyctl": 219,
        "add_key": 217,
        "request_key": 218,
        "bpf": 280,
        "perf_event_open": 241,
        "userfaultfd": 282,
        "io_uring_setup": 425,
        "io_uring_enter": 426,
        "io_uring_register": 427,
        "kexec_load": 104,
        "kexec_file_load": 294,
        "init_module": 105,
        "finit_module": 273,
        "delete_module": 106,
        "reboot": 142,
        "swapon": 224,
        "swapoff": 225,
        "acct": 89,
        "quotactl": 60,
        "quotactl_fd": 443,
        "open_by_handle_at": 265,
        "lookup_dcookie": 18,
        "syslog": 116,
        "settimeofday": 170,
        "clock_settime": 112,
        "clock_adjtime": 266,
        "adjtimex": 171,
        "clone": 220,
        "clone3": 435,
        "personality": 92,
        "ioctl": 29,
    },
}

# Denied outright with EPERM (names missing from an arch's table do not exist there).
DENY: tuple[str, ...] = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "unshare",
    "setns",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "open_by_handle_at",
    "lookup_dcookie",
    "syslog",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
)


@dataclass(frozen=True)
class Insn:
    """One BPF instruction; ``jt``/``jf`` may name a label instead of an offset."""

    code: int
    k: int = 0
    jt: int | str = 0
    jf: int | str = 0


_Item = Insn | str  # a str on its own line is a label


def assemble(items: Sequence[_Item]) -> list[tuple[int, int, int, int]]:
    """Resolve labels to forward jump offsets; returns (code, jt, jf, k) tuples."""
    labels: dict[str, int] = {}
    insns: list[Insn] = []
    for item in items:
        if isinstance(item, str):
            if item in labels:
                raise ValueError(f"duplicate label {item!r}")
            labels[item] = len(insns)
        else:
            insns.append(item)
    out: list[tuple[int, int, int, int]] = []
    for index, insn in enumerate(insns):
        offsets: list[int] = []
        for target in (insn.jt, insn.jf):
            if isinstance(target, str):
                if target not in labels:
                    raise ValueError(f"unknown label {target!r}")
                offset = labels[target] - index - 1
            else:
                offset = target
            if not 0 <= offset <= 255:
                raise ValueError(f"jump offset {offset} out of range at instruction {index}")
            offsets.append(offset)
        out.append((insn.code, offsets[0], offsets[1], insn.k & 0xFFFFFFFF))
    if len(out) > 4096:  # BPF_MAXINSNS
        raise ValueError("seccomp program too long")
    return out


def _load(offset: int) -> Insn:
    return Insn(BPF_LD_W_ABS, offset)


def _ret(value: int) -> Insn:
    return Insn(BPF_RET_K, value)


def program(arch: str) -> list[tuple[int, int, int, int]]:
    """The filter for ``arch`` as (code, jt, jf, k) tuples (see the module docstring)."""
    if arch not in SYSCALLS:
        raise Unsupported(f"seccomp filter for {arch}", "on x86_64 and aarch64")
    nrs = SYSCALLS[arch]
    eperm = SECCOMP_RET_ERRNO | errno.EPERM
    enosys = SECCOMP_RET_ERRNO | errno.ENOSYS
    items: list[_Item] = [
        _load(OFF_ARCH),
        Insn(BPF_JMP_JEQ_K, AUDIT_ARCH[arch], jt=0, jf="kill"),
        _load(OFF_NR),
    ]
    if arch == "x86_64":
        items.append(Insn(BPF_JMP_JGE_K, X32_SYSCALL_BIT, jt="enosys", jf=0))
    items += [Insn(BPF_JMP_JEQ_K, nrs[name], jt="eperm") for name in DENY if name in nrs]
    items += [
        Insn(BPF_JMP_JEQ_K, nrs["clone3"], jt="enosys"),
        Insn(BPF_JMP_JEQ_K, nrs["clone"], jt="clone"),
        Insn(BPF_JMP_JEQ_K, nrs["personality"], jt="personality"),
        Insn(BPF_JMP_JEQ_K, nrs["ioctl"], jt="ioctl"),
        _ret(SECCOMP_RET_ALLOW),  # no other syscall is filtered
        "clone",
        _load(_arg_lo(0)),
        Insn(BPF_JMP_JSET_K, CLONE_NEW_MASK, jt="eperm", jf="allow_args"),
        "personality",
        _load(_arg_lo(0)),
        Insn(BPF_JMP_JEQ_K, PER_LINUX, jt="allow_args"),
        Insn(BPF_JMP_JEQ_K, PER_QUERY, jt="allow_args", jf="eperm"),
        "ioctl",
        _load(_arg_lo(1)),
        Insn(BPF_JMP_JEQ_K, TIOCSTI, jt="eperm"),
        Insn(BPF_JMP_JEQ_K, TIOCLINUX, jt="eperm", jf="allow_args"),
        "allow_args",
        _ret(SECCOMP_RET_ALLOW),
        "eperm",
        _ret(eperm),
        "enosys",
        _ret(enosys),
        "kill",
        _ret(SECCOMP_RET_KILL_PROCESS),
    ]
    return assemble(items)


def host_arch() -> str:
    """The running machine's arch under the names ``SYSCALLS`` uses."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def build_filter(arch: str | None = None) -> bytes:
    """The packed ``struct sock_filter[]`` for ``arch`` (default: this machine's)."""
    return _packed(arch or host_arch())


@functools.cache
def _packed(arch: str) -> bytes:
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in program(arch))
