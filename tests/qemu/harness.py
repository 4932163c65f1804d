"""Boot Debian's 6.1 and 6.12 cloud kernels under QEMU and load (patched) modules: the kernel
judges.

A boot is a kernel image plus an initramfs holding a static busybox, an /init script and a
list of modules. /init mounts proc, sys and dev, insmods every module in order, runs a few
commands that exercise the loaded modules, and reports each step on /dev/kmsg as a marker
line (``PVQ-LOAD label ok``, ``PVQ-RUN name fail 1 ...``, ``PVQ-END``), so markers and kernel
messages are serialised in one log; then ``poweroff -f``. ``panic=-1`` turns a panic into an
immediate exit. A boot passes when every module expected to load printed ``ok`` (and every
module expected to be refused did not), every command succeeded, /init reached its end
marker, and the serial log holds none of the PROBLEMS patterns (oops, BUG, relocation
complaints, unknown symbols...).

Scenarios (``SCENARIOS``): the same set of Debian modules with paravirt sites (and their
dependencies), unpatched (``baseline``), patched with the native backend with the table
kept (``native``) and with ``--drop-patched`` (``native-drop``), patched with a spec that
sends ``irq.save_fl`` to the exported ``native_save_fl`` through an injected thunk
(``thunk``), native-patched and re-signed with a throw-away key (``resigned``, with a
corrupted-signature copy that must be refused), and the unpatched modules on a vmlinux
patched with the native backend (``vmlinux-native``).  With ``--final``: the thunk spec
(``final-thunk``, and with ``--drop-patched``: ``final-drop-thunk``), and the native
``--final`` modules on the native ``--final`` vmlinux (``vmlinux-final``).

Kernel stacks: a module with ``stacks`` is loaded under tests/qemu/kstack.c, which sets
execute hardware breakpoints (perf_event_open, system-wide) at the code places it names and
prints the kernel stack the running kernel's ORC unwinder walks at each hit, one
``PVQ-STACK``/``PVQ-FRAME`` line each, named through /proc/kallsyms.  ``final-thunk`` ends
with tcrypt instantiating cbc(aes-fixed-time) under breakpoints in aes_ti's thunk and on
aes_encrypt/aes_decrypt (the same frame without the thunk); ``kstack-orc-off-by-one`` is
its negative control: aes_ti alone with the thunk's ORC entry at the callee's return
address one push off.  final-thunk also loads tests/qemu/pvq, a small module built against
Debian's own headers, whose paravirt site is sent through a thunk to a C function that calls
dump_stack() (``BootResult.dumps``), and the same module with that ORC entry one push off.

Read-back: a boot with ``reads`` runs tests/qemu/kread.c after the exercises; it prints the
bytes the running kernel holds at each place through /proc/kcore (module sections from
/sys/module/NAME/sections/, vmlinux places at their link addresses: those boots add
``nokaslr``), one ``PVQ-READ label address hex`` line each, for the tests to compare with
pvpatch's output (``loaded_bytes``: relocated as the module loader does it) or with what the
report predicted.

Used by tests/test_qemu.py and scripts/qemu-harness. Needs qemu-system-x86_64 and a static
busybox (Debian: qemu-system-x86, busybox-static; installed on demand with apt-get) and the
corpus (tests/corpus.py fetches it).
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import corpus

import pvpatch
from pvpatch.elf.reader import ElfFile
from pvpatch.elf.sign import sign_module
from pvpatch.plan.backend import parse_spec_text
from pvpatch.rewrite.stage import Rewrite

QEMU = "qemu-system-x86_64"
QEMU_I386 = "qemu-system-i386"  # boots the i386 vmlinux through its PVH entry note
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
DEBIAN_PACKAGES = ("qemu-system-x86", "busybox-static")
BOOT_TIMEOUT = 240.0  # seconds; a boot takes about 5 s under TCG on one host core
APPEND = "console=ttyS0 panic=-1 rdinit=/init printk.devkmsg=on"

# Debian 6.1 cloud modules with paravirt sites that load in a bare QEMU guest (no hardware
# needed); their dependencies are added in load order from .modinfo `depends=`.
PV_MODULES = (
    "dm-mod", "macvlan", "team", "team_mode_activebackup", "rds", "cpuid", "aes_ti",
    "drop_monitor", "kvm", "bridge", "8021q", "erofs", "scsi_mod", "libata", "bonding",
    "vfio_iommu_type1", "drbd", "speedstep-lib",
)  # fmt: skip

# Commands run after loading: each exercises one or more loaded modules.
EXERCISES: tuple[tuple[str, str], ...] = (
    ("cpuid", "[ -n \"$(dd if=/dev/cpu/0/cpuid bs=16 count=1 2>/dev/null | od -An -tx4)\" ]"),
    ("aes-selftest", "grep -A6 'driver.*aes-fixed-time' /proc/crypto | grep -q 'selftest.*passed'"),
    ("dm-control", "[ -c /dev/mapper/control ]"),
    ("bridge", "ip link add pvbr0 type bridge && ip link set pvbr0 up"),
    ("vlan", "ip link add link pvbr0 name pvbr0.5 type vlan id 5 && ip link set pvbr0.5 up"),
    ("macvlan", "ip link add link pvbr0 name pvmv0 type macvlan && ip link set pvmv0 up"),
    ("bond", "ip link add pvbond0 type bond && ip link set pvbond0 up"),
    ("team", "ip link add pvteam0 type team && ip link set pvteam0 up"),
)

# Serial-log lines that fail a boot, whatever the scenario.
PROBLEMS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (name, re.compile(rx))
    for name, rx in (
        ("BUG", r"\bBUG:"),
        ("oops", r"\bOops\b"),
        ("general protection fault", r"general protection fault"),
        ("invalid opcode", r"invalid opcode"),
        ("page fault", r"unable to handle (?:page fault|kernel)"),
        ("panic", r"Kernel panic"),
        ("warning", r"\bWARNING:"),
        ("call trace", r"Call Trace:"),
        ("relocation", r"Unknown rela relocation|overflow in relocation|x86/modules:"
                       r"|Skipping invalid relocation|Unknown relocation"),
        ("unknown symbol", r"Unknown symbol|disagrees about version"),
        ("bad module", r"module has bad|Invalid module format|section header invalid"
                       r"|has an invalid|ELF header invalid"),
        ("alternatives", r"alternatives: .*(?:bad|invalid)"),
    )
)  # fmt: skip

SIG_TAINT = "module verification failed"  # pr_notice_once when a module's signature fails
MARK = re.compile(r"PVQ-(LOAD|RUN) (\S+) (ok|fail)(.*)$", re.M)
READ = re.compile(r"PVQ-READ (\S+) (?:([0-9a-f]+) ([0-9a-f]*)|fail (\S+))$", re.M)
STACK = re.compile(r"PVQ-STACK (\S+) (\d+) (\S+) hits=(\d+) frames=(\d+)$", re.M)
FRAME = re.compile(r"PVQ-FRAME (\S+) (\d+) (\d+) ([0-9a-f]+) (\S+?)(?:\+0x([0-9a-f]+))?"
                   r"(?: \[(\S+)\])?$", re.M)
STACK_END = re.compile(r"PVQ-STACK-END (\S+) (.*)$", re.M)
# tests/qemu/pvq's dump_stack(), bracketed by its own lines; the frame lines of the
# kernel's show_trace_log_lvl(): " [? ]SYMBOL+0xOFF/0xSIZE [MODULE]", or " [? ]0xVALUE" for
# a value with no symbol (printk's %pBb).
DUMP_BEGIN = re.compile(r"PVQ-DUMP (\S+) begin$")
DUMP_END = re.compile(r"PVQ-DUMP (\S+) end$")
DUMP_FRAME = re.compile(r"^(?:\[\s*\d+\.\d+\])?  (\? )?(?:0x([0-9a-f]+)|([\w.]+)\+0x([0-9a-f]+)"
                        r"/0x([0-9a-f]+)(?: \[(\w+)\])?)$")

Expect = Literal["load", "refuse"]


# ---------------------------------------------------------------------------- tools


def _is_static(path: str) -> bool:
    """An ELF executable without PT_INTERP (what the initramfs needs: no libc there)."""
    try:
        elf = pvpatch.open_elf(path)
    except pvpatch.PvpatchError:
        return False
    return not any(seg.type == 3 for seg in elf.segments)  # PT_INTERP


def find_busybox() -> str | None:
    for candidate in BUSYBOX_CANDIDATES:
        if os.path.isfile(candidate) and _is_static(candidate):
            return candidate
    return None


def ensure_tools() -> str:
    """Install qemu-system-x86 and busybox-static when missing; return the busybox path."""
    if shutil.which(QEMU) is None or find_busybox() is None:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run([*sudo, "apt-get", "update", "-qq"], env=env, check=False,
                       stdout=subprocess.DEVNULL)
        subprocess.run(
            [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends",
             *DEBIAN_PACKAGES],
            env=env, check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    busybox = find_busybox()
    if shutil.which(QEMU) is None or busybox is None:
        raise RuntimeError(f"{QEMU} or a static busybox is still missing after apt-get")
    return busybox


# ---------------------------------------------------------------------------- initramfs


def cpio_newc(entries: Iterable[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed `newc` cpio archive of (path, mode, data) entries, as the kernel reads.

    Directories have mode 0o040xxx and empty data. Timestamps and owners are zero, so the
    same entries always give the same bytes.
    """
    out = bytearray()

    def put(name: str, mode: int, data: bytes, ino: int) -> None:
        raw = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 2 if mode & 0o040000 else 1, 0, len(data), 0, 0, 0, 0,
                  len(raw), 0)  # fmt: skip
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + raw)
        out.extend(bytes(-len(out) % 4))
        out.extend(data)
        out.extend(bytes(-len(out) % 4))

    ino = 0
    for ino, (name, mode, data) in enumerate(entries, start=1):
        put(name, mode, data, ino)
    put("TRAILER!!!", 0, b"", ino + 1)
    return bytes(out)


@dataclass(frozen=True)
class GuestModule:
    """One module file for the guest: `label` names it in the markers (e.g. native/aes_ti).

    A compressed module (`.ko.xz`, as 6.12 ships them) is handed to the kernel as it is,
    through finit_module(MODULE_INIT_COMPRESSED_FILE): the kernel's own XZ decoder reads
    what pvpatch wrote, as kmod 31+ does it."""

    label: str
    data: bytes = field(repr=False)
    expect: Expect = "load"
    # Kernel code places (comma-separated, see tests/qemu/kstack.c) to break on while
    # this module loads: each hit's kernel stack, as the running kernel's unwinder walks
    # it, is printed by tests/qemu/kstack.c (BootResult.stacks).
    stacks: str = ""
    params: tuple[str, ...] = ()  # module parameters for insmod

    @property
    def suffix(self) -> str:
        return ".ko.xz" if self.data[:6] == b"\xfd7zXZ\x00" else ".ko"


@dataclass(frozen=True)
class Read:
    """A place whose bytes the guest reads back from the running kernel (/proc/kcore):
    `module` "-" means `offset` is a kernel virtual address."""

    label: str
    module: str
    section: str
    offset: int
    length: int


@dataclass(frozen=True)
class Boot:
    """What one QEMU boot runs: a kernel image, modules in load order, commands."""

    name: str
    kernel: Path
    modules: tuple[GuestModule, ...]
    exercises: tuple[tuple[str, str], ...] = EXERCISES
    append: str = ""  # extra kernel command line
    qemu_args: tuple[str, ...] = ()  # e.g. -cpu max, which 6.12 needs under TCG
    # i386 guests run a static `gcc -m32` /init (no busybox for them here): it loads the
    # modules and writes the same markers, and runs no exercises.
    arch: Literal["x86_64", "i386"] = "x86_64"
    reads: tuple[Read, ...] = ()  # read back after the exercises, by tests/qemu/kread.c


def init_script(boot: Boot) -> str:
    lines = [
        "#!/bin/busybox sh",
        "/bin/busybox mount -t proc proc /proc",
        "/bin/busybox mount -t sysfs sysfs /sys",
        "/bin/busybox mount -t devtmpfs devtmpfs /dev",
        "/bin/busybox --install -s /bin",
        'mark() { echo "PVQ-$*" > /dev/kmsg; }',
        "load() {",  # load LABEL FILE [BREAKPOINTS [PARAM...]]
        '  l=$1; f=$2; w=; [ -n "$3" ] && w="/bin/kstack $l $3 --"; shift; shift',
        '  [ $# -gt 0 ] && shift',
        '  case "$f" in *.xz) out=$($w /bin/finit "$f" 2>&1); rc=$? ;;',
        '  *) out=$($w insmod "$f" "$@" 2>&1); rc=$? ;; esac',
        '  if [ $rc -eq 0 ]; then mark "LOAD $l ok"; else mark "LOAD $l fail $rc" $out; fi',
        "}",
        "run() {",
        '  name=$1; out=$(sh -c "$2" 2>&1); rc=$?',
        '  if [ $rc -eq 0 ]; then mark "RUN $name ok"; else mark "RUN $name fail $rc" $out; fi',
        "}",
        "mark USERSPACE",
    ]
    for i, m in enumerate(boot.modules):
        extra = [m.stacks, *m.params] if m.stacks or m.params else []
        lines.append(" ".join(["load", shlex.quote(m.label), f"/m/{i:03d}{m.suffix}",
                               *map(shlex.quote, extra)]))
    for name, command in boot.exercises:
        lines.append(f"run {shlex.quote(name)} {shlex.quote(command)}")
    if boot.reads:
        lines.append("/bin/kread /m/reads")
    lines += [
        'mark "TAINTED $(cat /proc/sys/kernel/tainted)"',
        "mark END",
        "poweroff -f",
        "",
    ]
    return "\n".join(lines)


def initramfs(boot: Boot, busybox: str) -> bytes:
    if boot.arch == "i386":
        return _initramfs_i386(boot)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("bin", "dev", "m", "proc", "sys", "tmp")
    ]
    entries.append(("bin/busybox", 0o100755, Path(busybox).read_bytes()))
    entries.append(("init", 0o100755, init_script(boot).encode()))
    if any(m.suffix != ".ko" for m in boot.modules):
        entries.append(("bin/finit", 0o100755, finit_binary().read_bytes()))
    if boot.reads:
        entries.append(("bin/kread", 0o100755, kread_binary().read_bytes()))
        entries.append(("m/reads", 0o100644, _reads_listing(boot.reads)))
    if any(m.stacks for m in boot.modules):
        entries.append(("bin/kstack", 0o100755, kstack_binary().read_bytes()))
    entries += [(f"m/{i:03d}{m.suffix}", 0o100644, m.data) for i, m in enumerate(boot.modules)]
    return cpio_newc(entries)


@functools.cache
def init32_binary() -> Path:
    """/init for i386 guests: a static 32-bit C program (Debian's busybox-static is 64-bit)."""
    return _static_binary("init32.c", ["-m32"])


def _initramfs_i386(boot: Boot) -> bytes:
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o040755, b"") for d in ("dev", "m", "proc", "sys")
    ]
    entries.append(("init", 0o100755, init32_binary().read_bytes()))
    listing = "".join(f"{m.label} /m/{i:03d}.ko\n" for i, m in enumerate(boot.modules))
    entries.append(("m/list", 0o100644, listing.encode()))
    entries += [(f"m/{i:03d}.ko", 0o100644, m.data) for i, m in enumerate(boot.modules)]
    if boot.reads:
        entries.append(("bin", 0o040755, b""))
        entries.append(("bin/kread", 0o100755, kread32_binary().read_bytes()))
        entries.append(("m/reads", 0o100644, _reads_listing(boot.reads)))
    return cpio_newc(entries)


def _reads_listing(reads: Sequence[Read]) -> bytes:
    return "".join(f"{r.label} {r.module} {r.section} {r.offset:x} {r.length}\n"
                   for r in reads).encode()


@functools.cache
def kread32_binary() -> Path:
    """The read-back helper for i386 guests (/proc/kcore is ELF32 there)."""
    return _static_binary("kread.c", ["-m32"])


@functools.cache
def finit_binary() -> Path:
    """A static helper that loads a compressed module the way kmod 31+ does."""
    return _static_binary("finit.c", [])


@functools.cache
def kread_binary() -> Path:
    """A static helper that prints the running kernel's bytes at given places."""
    return _static_binary("kread.c", [])


@functools.cache
def kstack_binary() -> Path:
    """A static helper that prints the kernel stacks hardware breakpoints catch."""
    return _static_binary("kstack.c", [])


def _static_binary(source: str, flags: list[str]) -> Path:
    """A guest helper from tests/qemu/, built static (the initramfs has no libc)."""
    out = Path(tempfile.mkdtemp(prefix="pvq-bin-")) / source.removesuffix(".c")
    subprocess.run(["gcc", *flags, "-static", "-O2", "-Wall", "-Werror", "-o", str(out),
                    str(Path(__file__).with_name(source))], check=True)
    return out


# ---------------------------------------------------------------------------- boot


@dataclass(frozen=True)
class Frame:
    """One frame of a kernel stack the guest printed: the address, and the name
    /proc/kallsyms gives it (`module` None: vmlinux)."""

    address: int
    symbol: str
    offset: int
    module: str | None

    def __str__(self) -> str:
        where = f" [{self.module}]" if self.module else ""
        return f"{self.symbol}+{self.offset:#x}{where}"


@dataclass(frozen=True)
class Stack:
    """A distinct kernel stack seen at a breakpoint (`place`, as kstack was given it),
    `hits` times; frame 0 is the breakpoint's own address, then the return addresses the
    kernel's unwinder found."""

    place: str
    hits: int
    frames: tuple[Frame, ...]

    def names(self) -> list[str]:
        return [f.symbol for f in self.frames]


@dataclass(frozen=True)
class TraceLine:
    """One line of a kernel "Call Trace:" (show_trace_log_lvl): `reliable` False for the
    "? " lines (a text address found by scanning the stack, not a frame the unwinder
    reached); `symbol` None for a value kallsyms names nothing for (then `value` is it)."""

    reliable: bool
    symbol: str | None
    offset: int = 0
    size: int = 0
    module: str | None = None
    value: int = 0

    def __str__(self) -> str:
        mark = "" if self.reliable else "? "
        if self.symbol is None:
            return f"{mark}{self.value:#x}"
        where = f" [{self.module}]" if self.module else ""
        return f"{mark}{self.symbol}+{self.offset:#x}/{self.size:#x}{where}"


@dataclass(frozen=True)
class Dump:
    """One dump_stack() printed by tests/qemu/pvq: its Call Trace lines, in order."""

    trace: tuple[TraceLine, ...]
    lines: tuple[str, ...] = field(repr=False)  # the raw log lines between begin and end

    @classmethod
    def parse(cls, lines: Sequence[str]) -> Dump:
        trace = []
        for line in lines:
            m = DUMP_FRAME.match(line.strip("\r"))
            if m is None:
                continue
            unsure, value, sym, off, size, mod = m.groups()
            if sym is None:
                trace.append(TraceLine(unsure is None, None, value=int(value, 16)))
            else:
                trace.append(TraceLine(unsure is None, sym, int(off, 16), int(size, 16), mod))
        return cls(tuple(trace), tuple(lines))

    def walk(self) -> list[str]:
        """The frames the unwinder reached (no "? "), by name."""
        return [t.symbol or f"{t.value:#x}" for t in self.trace if t.reliable]

    def __str__(self) -> str:
        return " <- ".join(map(str, self.trace))


@dataclass(frozen=True)
class BootResult:
    boot: Boot = field(repr=False)
    log: str = field(repr=False)
    seconds: float
    returncode: int | None  # None: killed at the timeout
    loads: dict[str, str]  # label -> "ok" or "fail <rc> <insmod's message>"
    runs: dict[str, str]
    userspace: bool
    ended: bool
    tainted: int | None
    problems: tuple[str, ...]  # "<pattern name>: <log line>"
    # label -> (address, bytes) the running kernel held there, or the helper's complaint
    reads: dict[str, tuple[int, bytes] | str] = field(default_factory=dict)
    reads_ended: bool = False
    # module label -> the kernel stacks tests/qemu/kstack.c printed while it loaded, and
    # its end line ("samples=N lost=L rc=RC", or "fail why")
    stacks: dict[str, list[Stack]] = field(default_factory=dict)
    stacks_ended: dict[str, str] = field(default_factory=dict)
    # tag -> each dump_stack() tests/qemu/pvq printed under that tag, in log order
    dumps: dict[str, list[Dump]] = field(default_factory=dict)

    def failures(self) -> list[str]:
        """Everything that makes this boot a failure (empty: it passed)."""
        out: list[str] = []
        if self.returncode is None:
            out.append(f"timed out after {self.seconds:.0f} s")
        if not self.userspace:
            out.append("user space never started (no PVQ-USERSPACE marker)")
        elif not self.ended:
            out.append("/init did not reach its end marker")
        for m in self.boot.modules:
            got = self.loads.get(m.label)
            if got is None:
                if self.userspace:
                    out.append(f"{m.label}: no load marker")
            elif m.expect == "load" and got != "ok":
                out.append(f"{m.label}: expected to load, insmod said: {got}")
            elif m.expect == "refuse" and got == "ok":
                out.append(f"{m.label}: expected to be refused, but it loaded")
        for name, _ in self.boot.exercises:
            got = self.runs.get(name)
            if got != "ok" and self.ended:
                out.append(f"exercise {name}: {got}")
        if self.boot.reads and not self.reads_ended:
            out.append("the read-back helper did not finish")
        for m in self.boot.modules:
            end = self.stacks_ended.get(m.label)
            if m.stacks and (end is None or "fail" in end):
                out.append(f"stacks of {m.label}: {end or 'the helper did not finish'}")
        for r in self.boot.reads:
            if not isinstance(self.reads.get(r.label), tuple):
                out.append(f"read {r.label}: {self.reads.get(r.label, 'no line')}")
        out.extend(self.problems)
        return out

    def lines(self, pattern: str) -> list[str]:
        """Log lines matching the regex `pattern` (for reports and assertions)."""
        rx = re.compile(pattern)
        return [ln.strip() for ln in self.log.splitlines() if rx.search(ln)]


def parse_log(boot: Boot, log: str, seconds: float, returncode: int | None) -> BootResult:
    loads: dict[str, str] = {}
    runs: dict[str, str] = {}
    for kind, label, status, rest in MARK.findall(log):
        value = status if status == "ok" else f"fail{rest.rstrip()}"
        (loads if kind == "LOAD" else runs)[label] = value
    tainted_m = re.search(r"PVQ-TAINTED (\d+)", log)
    reads: dict[str, tuple[int, bytes] | str] = {}
    for label, addr, data, why in READ.findall(log):
        reads[label] = f"fail {why}" if why else (int(addr, 16), bytes.fromhex(data))
    frames: dict[tuple[str, int], list[Frame]] = {}
    for label, k, _i, addr, sym, off, mod in FRAME.findall(log):
        frames.setdefault((label, int(k)), []).append(
            Frame(int(addr, 16), sym, int(off or "0", 16), mod or None))
    stacks: dict[str, list[Stack]] = {}
    for label, k, sym, hits, _n in STACK.findall(log):
        stacks.setdefault(label, []).append(
            Stack(sym, int(hits), tuple(frames.get((label, int(k)), ()))))
    dumps, inside = _dumps(log)
    # A "Call Trace:" that pvq asked for is no problem; everything else in it still is.
    problems = tuple(
        f"{name}: {line.strip()}"
        for n, line in enumerate(log.splitlines())
        for name, rx in PROBLEMS
        if rx.search(line) and not (name == "call trace" and n in inside)
    )
    return BootResult(
        boot=boot,
        log=log,
        seconds=seconds,
        returncode=returncode,
        loads=loads,
        runs=runs,
        userspace="PVQ-USERSPACE" in log,
        ended="PVQ-END" in log,
        tainted=int(tainted_m.group(1)) if tainted_m else None,
        problems=problems,
        reads=reads,
        reads_ended="PVQ-READ-END" in log,
        stacks=stacks,
        stacks_ended=_stack_ends(log),
        dumps=dumps,
    )


def _dumps(log: str) -> tuple[dict[str, list[Dump]], set[int]]:
    """pvq's dumps (tag -> Dump per begin/end pair), and the numbers of the log lines
    inside them."""
    out: dict[str, list[Dump]] = {}
    inside: set[int] = set()
    tag: str | None = None
    lines: list[str] = []
    for n, line in enumerate(log.splitlines()):
        begin, end = DUMP_BEGIN.search(line), DUMP_END.search(line)
        if begin:
            tag, lines = begin.group(1), []
        elif end and tag == end.group(1):
            out.setdefault(tag, []).append(Dump.parse(lines))
            tag = None
        elif tag is not None:
            inside.add(n)
            lines.append(line)
    return out, inside


def _stack_ends(log: str) -> dict[str, str]:
    """label -> kstack's end line; a failure line (a place it could not break on) wins."""
    out: dict[str, str] = {}
    for label, rest in STACK_END.findall(log):
        if "fail" not in out.get(label, ""):
            out[label] = rest.strip()
    return out


def run_boot(
    boot: Boot, *, busybox: str | None = None, timeout: float = BOOT_TIMEOUT,
    keep: Path | None = None,
) -> BootResult:  # fmt: skip
    """Boot `boot` under QEMU (TCG, one CPU, 768 MiB) and judge the serial log.

    `keep`: a directory to leave the initramfs and log in (for a look by hand).
    """
    busybox = busybox or ensure_tools()
    with tempfile.TemporaryDirectory(prefix="pvq-") as tmp:
        work = keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        initrd = work / f"{boot.name}.cpio"
        initrd.write_bytes(initramfs(boot, busybox))
        qemu = QEMU_I386 if boot.arch == "i386" else QEMU
        cmd = [
            qemu, "-accel", "tcg", "-m", "768", "-smp", "1", "-nographic", "-no-reboot",
            "-no-user-config", "-kernel", str(boot.kernel), "-initrd", str(initrd),
            "-append", f"{APPEND} {boot.append}".strip(), *boot.qemu_args,
        ]  # fmt: skip
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
            )
            out, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = (exc.stdout or b"") + (exc.stderr or b"")
            rc = None
        seconds = time.monotonic() - start
        log = out.decode("utf-8", "replace").replace("\r\n", "\n")
        if keep is not None:
            (work / f"{boot.name}.log").write_text(log)
    return parse_log(boot, log, seconds, rc)


# ---------------------------------------------------------------------------- modules


def _norm(name: str) -> str:
    return name.replace("-", "_")


# The kernels booted: Debian's 6.1 (.parainstructions, plain .ko) and 6.12 (.altinstructions
# DIRECT_CALL sites, .ko.xz).  QEMU's default CPU model makes 6.12 oops in text patching
# with two CPUs (patched or not); -cpu max does not, and two CPUs exercise the lock ops.
Kernel = Literal["6.1", "6.12"]
QEMU_ARGS: dict[str, tuple[str, ...]] = {"6.1": (), "6.12": ("-cpu", "max", "-smp", "2")}


@functools.cache
def module_paths(kernel: Kernel = "6.1") -> dict[str, Path]:
    """Module name (dashes as underscores) -> its file in the corpus."""
    if kernel == "6.12":
        return {_norm(p.name.removesuffix(".ko.xz")): p for p in corpus.x86_64_612_modules()}
    return {_norm(p.name.removesuffix(".ko")): p for p in corpus.x86_64_modules()}


def load_order(names: Sequence[str], kernel: Kernel = "6.1") -> list[str]:
    """`names` with their dependencies (from .modinfo `depends=`), dependencies first."""
    paths = module_paths(kernel)
    order: list[str] = []

    def visit(name: str, stack: tuple[str, ...]) -> None:
        key = _norm(name)
        if key in order:
            return
        if key in stack:
            raise RuntimeError(f"dependency cycle: {' -> '.join((*stack, key))}")
        if key not in paths:
            raise RuntimeError(f"module {name} is not in the corpus")
        depends = pvpatch.open_elf(paths[key]).modinfo().get("depends", "")
        for dep in filter(None, depends.split(",")):
            visit(dep, (*stack, key))
        order.append(key)

    for n in names:
        visit(n, ())
    return order


def vmlinux(kernel: Kernel = "6.1") -> Path:
    path = corpus.x86_64_612_vmlinux() if kernel == "6.12" else corpus.x86_64_vmlinux()
    if path is None:
        raise RuntimeError("the corpus has no vmlinux")
    return path


def ops_source(kernel: Kernel = "6.1") -> str:
    return f"btf:{vmlinux(kernel)}"


THUNK_SPEC = """\
arch = "x86_64"

[ops."irq.save_fl"]
action = "call"
target = "native_save_fl"   # exported by 6.1 (EXPORT_SYMBOL in arch/x86/kernel/irqflags.S)
convention = "c"            # a C function: save_fl sites (CLBR_RET_REG) need a thunk

[defaults]
action = "keep"
reason = "only irq.save_fl is sent to native_save_fl"
"""


def patch(path: Path, backend: str, *, drop_patched: bool = False,
          kernel: Kernel = "6.1", final: bool = False) -> Rewrite:
    """Patch one file with the library API (`backend`: "native" or "thunk")."""
    scan = pvpatch.load(path, ops=ops_source(kernel))
    be = parse_spec_text(THUNK_SPEC, scan.arch, "<thunk spec>") if backend == "thunk" else backend
    # The CRCs of newly imported kernel functions come from the kernel image itself.
    return pvpatch.apply_plan(pvpatch.make_plan(scan, be, drop_patched=drop_patched,
                                                final=final),
                              symvers=vmlinux(kernel))


def output_bytes(rw: Rewrite, name: str) -> bytes:
    """What `pvpatch patch` writes for `rw`: compressed again when its input was."""
    with tempfile.TemporaryDirectory(prefix="pvq-out-") as tmp:
        out = Path(tmp) / name
        pvpatch.write_output(rw, out)
        return out.read_bytes()


@functools.cache
def throwaway_key() -> tuple[bytes, bytes]:
    """A fresh RSA-2048 key and self-signed certificate (PEM), unknown to the kernel."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from test_sign import _keypair

    return _keypair(rsa.generate_private_key(public_exponent=65537, key_size=2048),
                    "pvpatch throw-away key")


def corrupt_signature(signed: bytes) -> bytes:
    """`signed` with its PKCS#7 blob's outer SEQUENCE tag broken (the kernel must refuse)."""
    from pvpatch.elf.sign import read_trailer

    trailer = read_trailer(signed)
    assert trailer is not None
    at = trailer.offset
    assert signed[at] == 0x30
    return signed[:at] + b"\x31" + signed[at + 1 :]


@functools.cache
def variant(kind: str, kernel: Kernel = "6.1"
            ) -> tuple[tuple[str, Path, bytes, Rewrite | None], ...]:
    """(name, path, bytes, rewrite) per module in load order, for one way of patching;
    the bytes are the module file as written (`.ko.xz` for 6.12).

    kind: baseline | native | native-drop | thunk, or final-native | final-thunk |
    final-drop-thunk (--final, and --drop-patched).
    """
    out: list[tuple[str, Path, bytes, Rewrite | None]] = []
    for name in load_order(PV_MODULES, kernel):
        path = module_paths(kernel)[name]
        if kind == "baseline":
            out.append((name, path, path.read_bytes(), None))
            continue
        backend = "thunk" if kind.endswith("thunk") else "native"
        rw = patch(path, backend, drop_patched="drop" in kind, kernel=kernel,
                   final=kind.startswith("final-"))
        data = output_bytes(rw, path.name) if rw.changed else path.read_bytes()
        out.append((name, path, data, rw))
    return tuple(out)


def _guest(kind: str, data_of: Callable[[str, bytes], bytes] | None = None,
           kernel: Kernel = "6.1") -> list[GuestModule]:
    prefix = "612-" if kernel == "6.12" else ""
    return [
        GuestModule(f"{prefix}{kind}/{name}", data_of(name, data) if data_of else data)
        for name, _path, data, _rw in variant(kind, kernel)
    ]


@functools.cache
def vmlinux_rewrite(kernel: Kernel = "6.1", final: bool = False) -> Rewrite:
    """vmlinux patched with the native backend (table kept), `--final` or not."""
    return patch(vmlinux(kernel), "native", kernel=kernel, final=final)


@functools.cache
def patched_vmlinux(workdir: Path, kernel: Kernel = "6.1", final: bool = False) -> Path:
    """vmlinux patched with the native backend (table kept), written under `workdir`."""
    rw = vmlinux_rewrite(kernel, final)
    out = workdir / f"vmlinux-{kernel}.native{'-final' if final else ''}"
    out.write_bytes(rw.data)
    return out


# Sections the kernel frees once init has run: nothing there to read back.
def _freed_after_init(section: str) -> bool:
    return section.startswith(".init.")


def module_name(rw: Rewrite) -> str:
    """The name the module has in /sys/module."""
    return _norm(rw.plan.scan.elf.modinfo()["name"])


def reads_of(rw: Rewrite, prefix: str) -> list[Read]:
    """A read at every rewritten site (outside init sections) and every thunk of `rw`:
    modules through their section bases, a vmlinux at link addresses (nokaslr)."""
    linked = not rw.plan.scan.elf.is_relocatable
    module = "-" if linked else module_name(rw)
    out = []
    for p in rw.patches:
        site = p.decision.site
        if not p.decision.rewrites or p.after == p.before or _freed_after_init(site.section):
            continue
        if linked:
            assert site.address is not None
            out.append(Read(f"{prefix}/{site.index}", "-", "-", site.address, site.len))
        else:
            out.append(Read(f"{prefix}/{site.index}", module, site.section, site.offset,
                            site.len))
    for t in rw.thunks:
        if linked:
            assert t.address is not None
            out.append(Read(f"{prefix}/thunk/{t.spec.symbol}", "-", "-", t.address, t.size))
        else:
            out.append(Read(f"{prefix}/thunk/{t.spec.symbol}", module, t.section, t.offset,
                            t.size))
    return out


def variant_reads(kind: str, kernel: Kernel = "6.1") -> tuple[Read, ...]:
    return tuple(r for name, _p, _d, rw in variant(kind, kernel) if rw is not None
                 and rw.changed for r in reads_of(rw, f"{kind}/{name}"))


def scenario(name: str, workdir: Path) -> Boot:
    """The Boot of one scenario (`workdir` holds generated kernels)."""
    if name.startswith("612-"):
        return _scenario_612(name.removeprefix("612-"), workdir)
    if name.startswith("i386-"):
        return _scenario_i386(name.removeprefix("i386-"), workdir)
    if name in ("nobtf-native", "nobtf-io-delay"):
        kernel, _rw = patched_nobtf(workdir, name.removeprefix("nobtf-"))
        return Boot(name, kernel, (), ())
    kernel = vmlinux()
    if name in ("baseline", "native-drop"):
        return Boot(name, kernel, tuple(_guest(name)))
    if name in ("native", "thunk", "final-thunk", "final-drop-thunk"):
        # The running kernel's bytes at each rewritten site are read back (nokaslr: the
        # image at its link addresses; modules through their section bases).
        modules = _guest(name)
        if name == "final-thunk":
            # and then the kernel stacks in aes_ti's thunk (kstack_probe), and pvq's dumps
            # from its thunk's callee, right and with the thunk's ORC entry off by one
            modules.append(kstack_probe(variant_rewrite(name, KSTACK_MODULE), name))
            modules.extend(pvq_guests(name))
        return Boot(name, kernel, tuple(modules), append="nokaslr",
                    reads=variant_reads(name))
    if name == "kstack-orc-off-by-one":
        # The negative control of final-thunk's stacks: aes_ti alone, its thunk's ORC entry
        # for the callee's return address one push too far.
        rw = variant_rewrite("final-thunk", KSTACK_MODULE)
        data, _entry = orc_off_by_one(rw)
        return Boot(name, kernel, (GuestModule(f"orc-off-by-one/{KSTACK_MODULE}", data),
                                   kstack_probe(rw, name)), ())
    if name == "vmlinux-final":
        rw = vmlinux_rewrite(final=True)
        return Boot(name, patched_vmlinux(workdir, final=True),
                    tuple(_guest("final-native")), append="nokaslr",
                    reads=(*reads_of(rw, "vmlinux"), *variant_reads("final-native")))
    if name == "resigned":
        key, cert = throwaway_key()
        signed = {n: sign_module(d, key, cert) for n, _p, d, rw in variant("native")
                  if rw is not None and rw.changed}  # fmt: skip
        modules: list[GuestModule] = []
        for name_, _p, data, _rw in variant("native"):
            if name_ in signed:
                # The negative control first: a broken PKCS#7 blob must be refused...
                modules.append(GuestModule(f"corrupt/{name_}", corrupt_signature(signed[name_]),
                                           "refuse"))  # fmt: skip
                modules.append(GuestModule(f"resigned/{name_}", signed[name_]))
            else:
                modules.append(GuestModule(f"resigned/{name_}", data))
        # Dynamic debug shows what the kernel's PKCS#7 code made of the signatures.
        files = ("pkcs7_verify.c", "pkcs7_trust.c", "signing.c")
        dyndbg = "; ".join(f"file {f} +p" for f in files)
        return Boot(name, kernel, tuple(modules), append=f'loglevel=8 dyndbg="{dyndbg}"')
    if name == "vmlinux-native":
        return Boot(name, patched_vmlinux(workdir), tuple(_guest("baseline")))
    raise KeyError(name)


# -------------------------------------------------------------------- kernel stacks

# aes_ti runs its thunk (irq.save_fl -> native_save_fl, THUNK_SPEC) in aesti_encrypt and
# aesti_decrypt, then calls aes_encrypt / aes_decrypt from the same frame: a stack taken
# there is the reference (the same unwind without the thunk).  Once aes_ti is loaded,
# tcrypt instantiates cbc(aes-fixed-time), whose self-test runs aesti_encrypt/decrypt while
# insmod waits (then tcrypt refuses to stay loaded: EAGAIN, as designed).  The breakpoints
# sit in the thunk, not in its callee: native_save_fl is noinstr, and the kernel refuses a
# kprobe or an execute breakpoint there (perf_event_open says EINVAL).  At the instruction
# the callee returns to, the unwinder uses the very ORC entry it uses to step out of the
# callee (ORC looks a return address up at address - 1, a trap address as it is).
KSTACK_MODULE = "aes_ti"
KSTACK_CRYPTO = ("alg=cbc(aes-fixed-time)", "type=5")  # 5: CRYPTO_ALG_TYPE_SKCIPHER
KSTACK_REFERENCE = ("aes_encrypt", "aes_decrypt")


def kstack_places(rw: Rewrite) -> dict[str, int]:
    """Where kstack breaks in `rw`'s thunk: name -> offset in the thunk (its first
    instruction, and the instruction the callee returns to, where the stack is deepest).
    With the two reference functions that makes the four debug registers x86 has."""
    (thunk,) = rw.thunks
    return {"entry": 0, "return": thunk_call_return(rw.data, thunk.spec.symbol)}


def kstack_probe(rw: Rewrite, prefix: str) -> GuestModule:
    """tcrypt, loaded with breakpoints in `rw`'s thunk and on the reference functions."""
    (thunk,) = rw.thunks
    module = module_name(rw)
    places = [f"{module}:{thunk.spec.symbol}+{off:#x}" for off in kstack_places(rw).values()]
    path = module_paths()["tcrypt"]
    return GuestModule(f"{prefix}/kstack", path.read_bytes(), "refuse",
                       stacks=",".join([*places, *KSTACK_REFERENCE]), params=KSTACK_CRYPTO)


def variant_rewrite(kind: str, name: str, kernel: Kernel = "6.1") -> Rewrite:
    (rw,) = [rw for n, _p, _d, rw in variant(kind, kernel) if n == name]
    assert rw is not None
    return rw


@dataclass(frozen=True)
class OrcSlot:
    """One .orc_unwind entry of a thunk: its index, the thunk offset it starts at, and
    the 6.1 fields (sp_offset, and the word holding sp_reg, bp_reg, type, end)."""

    index: int
    offset: int
    sp_offset: int
    word: int


def thunk_orc(data: bytes, thunk: str) -> list[OrcSlot]:
    """The ORC entries (6.1 layout: s16 sp_offset, s16 bp_offset, u16 fields) whose
    .orc_unwind_ip slot is relocated against thunk `thunk` (by name or through its
    section's symbol), read with pyelftools rather than pvpatch."""
    import io

    from elftools.elf.elffile import ELFFile

    ef = ELFFile(io.BytesIO(data))
    symtab = ef.get_section_by_name(".symtab")
    (sym,) = [s for s in symtab.iter_symbols() if s.name == thunk]
    table = ef.get_section_by_name(".orc_unwind").data()
    out = []
    for r in ef.get_section_by_name(".rela.orc_unwind_ip").iter_relocations():
        target = symtab.get_symbol(r["r_info_sym"])
        if target["st_shndx"] != sym["st_shndx"]:
            continue
        at = (target["st_value"] if target.name else 0) + r["r_addend"] - sym["st_value"]
        if 0 <= at <= sym["st_size"]:
            index = r["r_offset"] // 4
            sp, _bp, word = struct.unpack_from("<hhH", table, 6 * index)
            out.append(OrcSlot(index, at, sp, word))
    return sorted(out, key=lambda e: e.offset)


def thunk_call_return(data: bytes, thunk: str) -> int:
    """The offset in `thunk` its call to the callee returns to (the end of its one
    `call rel32`, found through the PLT32 relocation in the thunk's section)."""
    import io

    from elftools.elf.elffile import ELFFile

    ef = ELFFile(io.BytesIO(data))
    symtab = ef.get_section_by_name(".symtab")
    (sym,) = [s for s in symtab.iter_symbols() if s.name == thunk]
    section = ef.get_section(sym["st_shndx"])
    code = section.data()
    rels = ef.get_section_by_name(f".rela{section.name}")
    (call,) = [r for r in rels.iter_relocations() if r["r_info_type"] == R_X86_64_PLT32
               and sym["st_value"] <= r["r_offset"] < sym["st_value"] + sym["st_size"]
               and code[r["r_offset"] - 1] == 0xE8]  # call rel32 (the return is a jmp)
    return call["r_offset"] + 4 - sym["st_value"]


def orc_off_by_one(rw: Rewrite) -> tuple[bytes, OrcSlot]:
    """`rw`'s output with the ORC entry its thunk's callee returns into (the one the
    kernel's unwinder uses to step from the callee through the thunk) stating one push
    more than the real stack: the unwinder then reads the return address from the wrong
    slot.  Returns the bytes and the entry changed (before the change)."""
    import io

    from elftools.elf.elffile import ELFFile

    (thunk,) = rw.thunks
    name = thunk.spec.symbol
    ret = thunk_call_return(rw.data, name)
    entry = max((e for e in thunk_orc(rw.data, name) if e.offset <= ret - 1),
                key=lambda e: e.offset)
    table_at = ELFFile(io.BytesIO(rw.data)).get_section_by_name(".orc_unwind")["sh_offset"]
    data = bytearray(rw.data)
    struct.pack_into("<h", data, table_at + 6 * entry.index, entry.sp_offset + 8)
    return bytes(data), entry


# tests/qemu/pvq: a module built here against Debian's headers for the booted kernel, whose
# one paravirt site (irq.save_fl in pvq_site) PVQ_SPEC sends through an injected thunk to
# pvq_save_fl, a C function in the module that calls dump_stack().  The thunk's callee is
# then code the kernel lets us run anything in (native_save_fl, aes_ti's callee, is
# noinstr: no kprobe there), and the dump is the kernel's own: show_trace_log_lvl() walks
# the ORC unwinder and marks "? " every text address on the stack it did not reach.
PVQ_DIR = Path(__file__).with_name("pvq")
PVQ_SPEC = """\
arch = "x86_64"

[ops."irq.save_fl"]
action = "call"
target = "pvq_save_fl"      # defined in the module itself: a plain C function
convention = "c"            # save_fl sites (CLBR_RET_REG) need a thunk

[defaults]
action = "keep"
reason = "pvq has one site"
"""
PVQ_CALLEE, PVQ_SITE, PVQ_INIT = "pvq_save_fl", "pvq_site", "pvq_init"
PVQ_TAGS = ("thunk", "orc-off-by-one")  # final-thunk loads pvq twice, with these tags


@functools.cache
def pvq_module() -> Path:
    """tests/qemu/pvq built with `make -C <Debian's headers> M=...` (kbuild, modpost,
    objtool and gcc-12 as Debian builds its own modules): its vermagic and symbol CRCs are
    the corpus kernel's."""
    headers = corpus.x86_64_headers()
    build = Path(tempfile.mkdtemp(prefix="pvq-mod-"))
    for src in PVQ_DIR.iterdir():
        if src.suffix in (".c", "") and src.is_file():
            shutil.copy(src, build / src.name)
    proc = subprocess.run(["make", "-C", str(headers), f"M={build}", "modules"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building tests/qemu/pvq failed:\n{proc.stdout}\n{proc.stderr}")
    return build / "pvq.ko"


@functools.cache
def pvq_rewrite() -> Rewrite:
    """pvq patched with PVQ_SPEC and --final (the kernel keeps the call to the thunk)."""
    scan = pvpatch.load(pvq_module(), ops=ops_source())
    spec = parse_spec_text(PVQ_SPEC, scan.arch, "<pvq spec>")
    return pvpatch.apply_plan(pvpatch.make_plan(scan, spec, final=True),
                              symvers=vmlinux())


def pvq_guests(prefix: str) -> tuple[GuestModule, ...]:
    """pvq as patched, then with its thunk's ORC entry at the callee's return address one
    push off (orc_off_by_one): each dumps the stack from pvq_save_fl under its tag, then
    refuses to stay loaded."""
    rw = pvq_rewrite()
    bad, _entry = orc_off_by_one(rw)
    good_tag, bad_tag = PVQ_TAGS
    return (GuestModule(f"{prefix}/pvq", rw.data, "refuse", params=(f"tag={good_tag}",)),
            GuestModule(f"{prefix}/pvq-{bad_tag}", bad, "refuse", params=(f"tag={bad_tag}",)))


def _scenario_612(name: str, workdir: Path) -> Boot:
    """6.12: the modules as shipped (.ko.xz), native-patched (.ko.xz again, the entries at
    rewritten sites neutralised) and native-patched with --drop-patched, and the unpatched
    modules on a native-patched vmlinux."""
    args = QEMU_ARGS["6.12"]
    if name in ("baseline", "native-drop"):
        return Boot(f"612-{name}", vmlinux("6.12"), tuple(_guest(name, kernel="6.12")),
                    qemu_args=args)
    if name == "native":
        return Boot("612-native", vmlinux("6.12"), tuple(_guest(name, kernel="6.12")),
                    qemu_args=args, append="nokaslr",
                    reads=variant_reads("native", "6.12"))
    if name == "vmlinux-native":
        return Boot("612-vmlinux-native", patched_vmlinux(workdir, "6.12"),
                    tuple(_guest("baseline", kernel="6.12")), qemu_args=args,
                    append="nokaslr", reads=tuple(reads_of(vmlinux_rewrite("6.12"),
                                                           "vmlinux")))
    raise KeyError(f"612-{name}")


IO_DELAY_SPEC = """\
[ops."cpu.io_delay"]
action = "call"
target = "native_io_delay"  # exported: its address comes from the image's own __ksymtab
"""


def i386_vmlinux() -> Path:
    path = corpus.i386_vmlinux()
    if path is None:
        raise RuntimeError("the corpus has no i386 vmlinux")
    return path


@functools.cache
def patched_i386(workdir: Path, kind: str) -> tuple[Path, Rewrite]:
    """The i386 image patched natively or with io_delay sent to native_io_delay, with
    no --ops and no symbol file: op names and the target come from the image itself."""
    return _patch_image(i386_vmlinux(), kind, workdir / f"vmlinux-i386.{kind}")


@functools.cache
def patched_nobtf(workdir: Path, kind: str) -> tuple[Path, Rewrite]:
    """Debian's 6.1 x86-64 image with its BTF removed (as i386 ships), patched natively or
    with io_delay sent to native_io_delay, with no --ops and no symbol file."""
    bare = workdir / "vmlinux-nobtf"
    if not bare.exists():
        subprocess.run(["objcopy", "--remove-section", ".BTF", str(vmlinux()), str(bare)],
                       check=True)
    return _patch_image(bare, kind, workdir / f"vmlinux-nobtf.{kind}")


def _patch_image(image: Path, kind: str, out: Path) -> tuple[Path, Rewrite]:
    """`image` patched natively (`kind` native, or final: with --final) or with
    IO_DELAY_SPEC (io-delay), no --ops and no symbol file."""
    scan = pvpatch.load(image)
    backend = parse_spec_text(IO_DELAY_SPEC, scan.arch, "<io_delay spec>") \
        if kind == "io-delay" else "native"
    rw = pvpatch.apply_plan(pvpatch.make_plan(scan, backend, final=kind == "final"))
    out.write_bytes(rw.data)
    return out, rw


def _scenario_i386(name: str, workdir: Path) -> Boot:
    if name == "baseline":
        return Boot("i386-baseline", i386_vmlinux(), (), (), arch="i386")
    if name in ("vmlinux-native", "vmlinux-io-delay", "vmlinux-final"):
        # nokaslr: image sites are read back at their link addresses.
        kernel, rw = patched_i386(workdir, name.removeprefix("vmlinux-"))
        return Boot(f"i386-{name}", kernel, (), (), arch="i386", append="nokaslr",
                    reads=tuple(reads_of(rw, "vmlinux")))
    raise KeyError(f"i386-{name}")


SCENARIOS = (
    "baseline", "native", "native-drop", "thunk", "final-thunk", "final-drop-thunk",
    "kstack-orc-off-by-one", "vmlinux-final", "resigned",
    "vmlinux-native", "612-baseline", "612-native", "612-native-drop",
    "612-vmlinux-native", "i386-baseline", "i386-vmlinux-native", "i386-vmlinux-io-delay",
    "i386-vmlinux-final",
    "nobtf-native", "nobtf-io-delay",
)  # fmt: skip


# ---------------------------------------------------------------------------- modversions


@functools.cache
def vmlinux_crcs() -> dict[str, int]:
    """Exported symbol -> CRC, from vmlinux's __ksymtab{,_gpl} and __kcrctab{,_gpl}.

    6.1 x86-64 `struct kernel_symbol` is three s32 offsets (value, name, namespace),
    each relative to its own field; __kcrctab is a parallel array of u32.
    """
    elf = pvpatch.open_elf(vmlinux())
    out: dict[str, int] = {}
    for tab, crctab in (("__ksymtab", "__kcrctab"), ("__ksymtab_gpl", "__kcrctab_gpl")):
        ks, kc = elf.section(tab), elf.section(crctab)
        if ks is None or kc is None:
            continue
        syms, crcs = elf.section_data(ks), elf.section_data(kc)
        for i in range(min(len(syms) // 12, len(crcs) // 4)):
            (name_rel,) = struct.unpack_from("<i", syms, i * 12 + 4)
            at = elf.addr_to_offset(ks.addr + i * 12 + 4 + name_rel)
            if at is None:
                continue
            name = elf.data[at : elf.data.find(b"\0", at)].decode()
            out[name] = struct.unpack_from("<I", crcs, i * 4)[0]
    return out


def missing_versions(data: bytes) -> list[str]:
    """Undefined symbols of a module without a `__versions` entry (modpost would add one)."""
    elf = _elf(data)
    sec = elf.section("__versions")
    have: set[str] = set()
    if sec is not None:
        raw = elf.section_data(sec)
        have = {raw[i + 8 : i + 64].split(b"\0")[0].decode() for i in range(0, len(raw), 64)}
    return sorted(
        s.name for s in elf.symbols
        if s.shndx == 0 and s.name and s.name not in have and s.name != ".TOC."
    )  # fmt: skip


def _elf(data: bytes) -> ElfFile:
    return ElfFile(data)


# ---------------------------------------------------------------------------- read-back


@functools.cache
def vmlinux_exports(kernel: Kernel = "6.1") -> dict[str, int]:
    """Exported symbol -> address, from vmlinux's __ksymtab{,_gpl} (x86-64 6.1/6.12: three
    s32 offsets per entry, value then name, each relative to its own field)."""
    elf = pvpatch.open_elf(vmlinux(kernel))
    out: dict[str, int] = {}
    for tab in ("__ksymtab", "__ksymtab_gpl"):
        ks = elf.section(tab)
        if ks is None:
            continue
        syms = elf.section_data(ks)
        for i in range(len(syms) // 12):
            value_rel, name_rel = struct.unpack_from("<ii", syms, i * 12)
            at = elf.addr_to_offset(ks.addr + i * 12 + 4 + name_rel)
            if at is None:
                continue
            name = elf.data[at : elf.data.find(b"\0", at)].decode()
            out[name] = (ks.addr + i * 12 + value_rel) & (1 << 64) - 1
    return out


R_X86_64_PC32, R_X86_64_PLT32 = 2, 4
# 6.1 apply_returns() on a CPU without X86_FEATURE_RETHUNK (QEMU's default model is not
# affected by retbleed): each `jmp __x86_return_thunk` listed in .return_sites becomes
# `ret` padded with int3.
RETURN_AS_RET = bytes.fromhex("c3cccccccc")


def loaded_bytes(rw: Rewrite, section: str, offset: int, length: int,
                 bases: dict[str, int], kernel: Kernel = "6.1") -> bytes:
    """What the kernel's module loader makes of `length` bytes of `rw`'s output at
    `section`+`offset`: the bytes with every PC32/PLT32 relocation there applied, symbols
    placed at the guest's section `bases` or the kernel's export table (read with
    pyelftools, not pvpatch)."""
    import io

    from elftools.elf.elffile import ELFFile
    from elftools.elf.relocation import RelocationSection

    ef = ELFFile(io.BytesIO(rw.data))
    sec = ef.get_section_by_name(section)
    data = bytearray(sec.data()[offset : offset + length])
    where = bases[section] + offset
    symtab = ef.get_section_by_name(".symtab")
    for rs in ef.iter_sections():
        if not isinstance(rs, RelocationSection) or \
                ef.get_section(rs["sh_info"]).name != section:
            continue
        for r in rs.iter_relocations():
            at = r["r_offset"] - offset
            if not 0 <= at < length:
                continue
            if r["r_info_type"] not in (R_X86_64_PC32, R_X86_64_PLT32) or at + 4 > length:
                raise AssertionError(f"relocation type {r['r_info_type']} at {section}"
                                     f"+{r['r_offset']:#x}")
            sym = symtab.get_symbol(r["r_info_sym"])
            if sym["st_shndx"] == "SHN_UNDEF":
                target = vmlinux_exports(kernel)[sym.name]
            else:
                target = bases[ef.get_section(sym["st_shndx"]).name] + sym["st_value"]
            value = target + r["r_addend"] - (where + at)
            data[at : at + 4] = struct.pack("<i", value)
    for at in _listed_returns(ef, section, offset, length):
        data[at : at + len(RETURN_AS_RET)] = RETURN_AS_RET
    return bytes(data)


def _listed_returns(ef: Any, section: str, offset: int, length: int) -> list[int]:
    """Offsets inside the range of the `jmp __x86_return_thunk` that .return_sites lists
    (each entry a PC32 relocation against the place)."""
    from elftools.elf.relocation import RelocationSection

    out = []
    symtab = ef.get_section_by_name(".symtab")
    for rs in ef.iter_sections():
        if not isinstance(rs, RelocationSection) or \
                ef.get_section(rs["sh_info"]).name != ".return_sites":
            continue
        for r in rs.iter_relocations():
            sym = symtab.get_symbol(r["r_info_sym"])
            if sym["st_shndx"] == "SHN_UNDEF" or \
                    ef.get_section(sym["st_shndx"]).name != section:
                continue
            at = sym["st_value"] + r["r_addend"] - offset
            if 0 <= at < length:
                out.append(at)
    return out


def section_bases(reads: Sequence[Read], got: dict[str, tuple[int, bytes] | str]
                  ) -> dict[tuple[str, str], int]:
    """(module, section) -> the address the guest loaded it at, from the read-back."""
    out: dict[tuple[str, str], int] = {}
    for r in reads:
        hit = got.get(r.label)
        if r.module != "-" and isinstance(hit, tuple):
            out[(r.module, r.section)] = hit[0] - r.offset
    return out
