"""The kernel judges pvpatch's output: boot Debian's 6.1 and 6.12 cloud kernels under QEMU.

One boot per scenario (tests/qemu/harness.py): the same Debian modules with paravirt sites
(and their dependencies) unpatched, native-patched (table kept, and --drop-patched),
thunk-patched, re-signed with a throw-away key, and unpatched on a native-patched vmlinux;
for 6.12 the modules as shipped (.ko.xz) and native-patched written back as .ko.xz, each
loaded with finit_module(MODULE_INIT_COMPRESSED_FILE) so the kernel's own XZ decoder reads
pvpatch's output, and the native-patched 6.12 vmlinux booted on two CPUs.
Each boot takes about 3-5 s of software emulation (TCG); the serial log must show every
module loaded, /init's end marker, and no oops, BUG, relocation or symbol complaint.
Several boots also read the running kernel's text back through /proc/kcore at every
rewritten site: with --final it is pvpatch's output, without it what the report predicted.
The final-thunk boot also takes kernel stacks at hardware breakpoints in a module's thunk:
the kernel's ORC unwinder walks through it (and stops there when its ORC entry is wrong);
and it loads tests/qemu/pvq (built against Debian's headers for that kernel), whose thunk's
callee calls dump_stack(): the kernel's own Call Trace walks through the thunk (and loses
the site's function when the thunk's ORC entry is off by one).
QEMU and busybox-static are installed when missing, the corpus is fetched when missing.
"""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import corpus
import pytest
from qemu import harness

import pvpatch
from pvpatch.errors import RewriteError
from pvpatch.rewrite.stage import Rewrite

# Every test here reads the corpus; those that boot a kernel are marked qemu too.
pytestmark = pytest.mark.corpus

Booter = Callable[[str], harness.BootResult]


# Boots run this many at a time: each is one QEMU process, mostly one busy host core.
BOOT_WORKERS = 2
ASKED = re.compile(r'\bboot\((f?)"([^"]+)"\)')


def _asked(items: list[pytest.Item]) -> list[str]:
    """The scenarios the selected tests of this module boot, in the order they ask for
    them (read from each test's `boot("...")` calls; an f-string takes the test's
    parameters)."""
    names: list[str] = []
    for item in items:
        if not isinstance(item, pytest.Function) or item.module is not sys.modules[__name__]:
            continue
        params = item.callspec.params if hasattr(item, "callspec") else {}
        for m in ASKED.finditer(inspect.getsource(item.function)):
            name = m.group(2).format(**params) if m.group(1) else m.group(2)
            if name not in names:
                names.append(name)
    return names


@pytest.fixture(scope="module")
def boot(request: pytest.FixtureRequest,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booter]:
    """Boot a scenario once per test module; later calls reuse the result.

    While a test waits for its boot, the boots the next selected tests ask for already run
    (BOOT_WORKERS at a time).  Scenarios are built here, one after the other, on the
    calling thread: they share generated files (a patched vmlinux), written once."""
    busybox = harness.ensure_tools()
    workdir = tmp_path_factory.mktemp("qemu")
    ahead = _asked(request.session.items)
    futures: dict[str, Future[harness.BootResult]] = {}
    pool = ThreadPoolExecutor(max_workers=BOOT_WORKERS)

    def start(name: str) -> None:
        if name in futures:
            return
        try:
            spec = harness.scenario(name, workdir)
        except Exception as exc:  # the test that asks for it fails with this
            futures[name] = Future()
            futures[name].set_exception(exc)
            return
        futures[name] = pool.submit(harness.run_boot, spec, busybox=busybox)

    def get(name: str) -> harness.BootResult:
        start(name)
        # Keep the pool busy with the next scenarios asked for while this one runs.
        for nxt in ahead:
            if sum(not f.done() for f in futures.values()) > BOOT_WORKERS:
                break
            start(nxt)
        return futures[name].result()

    yield get
    pool.shutdown(wait=True, cancel_futures=True)


def _passed(result: harness.BootResult) -> None:
    failures = result.failures()
    if failures:
        tail = "\n".join(result.log.splitlines()[-60:])
        listed = "\n".join(failures[:40])
        pytest.fail(f"{result.boot.name}: {listed}\n--- serial log tail ---\n{tail}")


def _changed(kind: str) -> list[tuple[str, pvpatch.rewrite.stage.Rewrite]]:
    return [(n, rw) for n, _p, _d, rw in harness.variant(kind) if rw is not None and rw.changed]


@pytest.mark.qemu
def test_baseline_unpatched_modules_load(boot: Booter) -> None:
    result = boot("baseline")
    _passed(result)
    assert len(result.loads) == len(harness.load_order(harness.PV_MODULES)) >= 20
    # Debian's build key is compiled in: the original signatures verify, nothing is tainted.
    assert harness.SIG_TAINT not in result.log
    assert result.tainted == 0


@pytest.mark.qemu
def test_native_patched_modules_load_with_table_kept(boot: Booter) -> None:
    changed = _changed("native")
    assert len(changed) >= 15
    assert all(rw.signature_removed for _n, rw in changed)
    assert sum(p.after != p.before for _n, rw in changed for p in rw.patches) >= 40
    result = boot("native")
    _passed(result)
    # The signatures were removed (they no longer matched): the kernel loads and taints (E).
    assert result.lines(rf"{harness.SIG_TAINT}: signature and/or required key missing")
    assert result.tainted is not None and result.tainted & (1 << 13)


@pytest.mark.qemu
def test_native_drop_patched_modules_load(boot: Booter) -> None:
    changed = _changed("native-drop")
    assert sum(rw.dropped_entries for _n, rw in changed) >= 40
    _passed(boot("native-drop"))


def test_thunk_spec_injects_thunks_into_modules() -> None:
    changed = _changed("thunk")
    with_thunks = [(n, rw) for n, rw in changed if rw.thunks]
    assert len(with_thunks) >= 12
    for _name, rw in with_thunks:
        (thunk,) = rw.thunks
        assert (thunk.section, thunk.spec.target) == (".text.pvpatch", "native_save_fl")
        elf = pvpatch.elf.reader.ElfFile(rw.data)
        assert elf.section(".text.pvpatch") is not None
        undefined = {s.name for s in elf.symbols if s.shndx == 0}
        assert "native_save_fl" in undefined


@pytest.mark.qemu
def test_thunk_spec_modules_load(boot: Booter) -> None:
    """Thunk-patched modules, with the __versions entry pvpatch adds, load and run."""
    _passed(boot("thunk"))


def test_added_symbol_versions_match_the_kernel() -> None:
    """pvpatch's CRCs (pvpatch.rewrite.modversions) agree with the harness's own
    export-table reader."""
    from pvpatch.rewrite import modversions
    mine = modversions.read_crcs(harness.vmlinux())
    theirs = harness.vmlinux_crcs()
    assert mine == theirs and mine["native_save_fl"] == 0x9D70541A
    for _name, rw in _changed("thunk"):
        elf = pvpatch.elf.reader.ElfFile(rw.data)
        sec = elf.section("__versions")
        assert sec is not None
        assert "native_save_fl" in modversions.names_in(elf.section_data(sec), elf.arch)
        assert "native_save_fl" not in harness.missing_versions(rw.data)


@pytest.mark.qemu
def test_resigned_modules_load_as_unknown_key(boot: Booter) -> None:
    _key_pem, cert_pem = harness.throwaway_key()
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(cert_pem).serial_number
    result = boot("resigned")
    _passed(result)
    # The kernel parsed each PKCS#7 blob and looked its signer (our serial) up in vain...
    serial_hex = format(serial, "x")
    serial_hex = serial_hex.rjust(len(serial_hex) + len(serial_hex) % 2, "0")
    assert result.lines(rf"PKCS7: Sig 1: Issuing X\.509 cert not found \(#{serial_hex}")
    # ...loaded the module as one with an unavailable key (tainted, not refused)...
    assert result.lines(harness.SIG_TAINT)
    resigned = [m for m in result.boot.modules if m.label.startswith("resigned/")]
    assert all(result.loads[m.label] == "ok" for m in resigned)
    # ...while the same blob with its outer tag broken is refused as a bad message.
    corrupt = [m for m in result.boot.modules if m.label.startswith("corrupt/")]
    assert len(corrupt) >= 15
    assert all(result.loads[m.label].startswith("fail 74") for m in corrupt)  # EBADMSG


@pytest.mark.qemu
def test_native_patched_vmlinux_boots(boot: Booter) -> None:
    rw = harness.patch(harness.vmlinux(), "native")
    counts = rw.plan.counts()
    assert counts.get("inline", 0) >= 2000
    assert any(p.decision.site.op == "mmu.read_cr2" and p.after != p.before for p in rw.patches)
    result = boot("vmlinux-native")
    _passed(result)
    assert result.boot.kernel != harness.vmlinux()


def test_vmlinux_drop_patched_is_refused(tmp_path: Path) -> None:
    vmlinux = harness.vmlinux()
    scan = pvpatch.load(vmlinux, ops=harness.ops_source())
    with pytest.raises(RewriteError, match="refused for linked files"):
        pvpatch.apply_plan(pvpatch.make_plan(scan, "native", drop_patched=True))
    out = tmp_path / "vmlinux.dropped"
    proc = subprocess.run(
        [sys.executable, "-m", "pvpatch", "patch", str(vmlinux), "-o", str(out),
         "--ops", harness.ops_source(), "--drop-patched"],
        capture_output=True, text=True, cwd=corpus.REPO,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--drop-patched is refused for linked files" in proc.stderr
    assert not out.exists()


# -- Linux 6.12: .altinstructions DIRECT_CALL sites, modules as .ko.xz ------------------

XZ_MAGIC = b"\xfd7zXZ\x00"


@pytest.mark.qemu
def test_612_shipped_compressed_modules_load(boot: Booter) -> None:
    """The control: Debian's own .ko.xz files, loaded through the kernel's XZ decoder."""
    result = boot("612-baseline")
    _passed(result)
    assert all(m.data.startswith(XZ_MAGIC) for m in result.boot.modules)
    assert len(result.loads) == len(harness.load_order(harness.PV_MODULES, "6.12")) >= 20


@pytest.mark.qemu
def test_612_native_patched_modules_load_as_ko_xz(boot: Booter) -> None:
    changed = [(n, data, rw) for n, _p, data, rw in harness.variant("native", "6.12")
               if rw is not None and rw.changed]
    assert len(changed) >= 15
    for _name, data, rw in changed:
        assert data.startswith(XZ_MAGIC)  # written back compressed, as shipped
        assert rw.neutralised_entries == sum(len(p.decision.site.entry_indices)
                                             for p in rw.patches if p.decision.rewrites)
    assert sum(p.after != p.before for _n, _d, rw in changed for p in rw.patches) >= 40
    result = boot("612-native")
    _passed(result)
    assert result.lines(rf"{harness.SIG_TAINT}: signature and/or required key missing")


@pytest.mark.qemu
def test_612_native_drop_patched_modules_load(boot: Booter) -> None:
    changed = [rw for _n, _p, _d, rw in harness.variant("native-drop", "6.12")
               if rw is not None and rw.changed]
    assert sum(rw.dropped_entries for rw in changed) >= 40
    _passed(boot("612-native-drop"))


@pytest.mark.qemu
def test_612_native_patched_vmlinux_boots(boot: Booter) -> None:
    rw = harness.patch(harness.vmlinux("6.12"), "native", kernel="6.12")
    counts = rw.plan.counts()
    with_native = sum(1 for d in rw.plan.decisions if d.site.native is not None)
    assert counts.get("inline", 0) == with_native >= 2500
    assert rw.neutralised_entries == 2 * with_native
    result = boot("612-vmlinux-native")
    _passed(result)
    assert result.boot.kernel != harness.vmlinux("6.12")
    assert result.lines(r"smp: Brought up 1 node, 2 CPUs")


# -- i386 6.1: a distribution image with no BTF, DWARF or .symtab -------------------------


@pytest.mark.qemu
def test_i386_image_boots(boot: Booter) -> None:
    _passed(boot("i386-baseline"))


@pytest.mark.qemu
def test_i386_native_patched_image_boots(boot: Booter, tmp_path: Path) -> None:
    """No --ops: the image's release string names its ops; the lock ops' native forms are
    inlined and the image boots under qemu-system-i386."""
    _kernel, rw = harness.patched_i386(tmp_path, "native")
    assert rw.plan.scan.ops is not None and "(release " in rw.plan.scan.ops.name
    counts = rw.plan.counts()
    assert counts["inline"] == 53 and counts["inline"] + counts["keep"] == 265
    result = boot("i386-vmlinux-native")
    _passed(result)
    assert result.boot.arch == "i386"


@pytest.mark.qemu
def test_i386_io_delay_calls_boot(boot: Booter, tmp_path: Path) -> None:
    """A spec sends cpu.io_delay to native_io_delay, whose address only the image's export
    table knows: all 153 sites call it directly, and the image boots."""
    _kernel, rw = harness.patched_i386(tmp_path, "io-delay")
    assert rw.plan.counts().get("call") == 153
    assert rw.plan.targets["native_io_delay"].source == "export table"
    _passed(boot("i386-vmlinux-io-delay"))


@pytest.mark.qemu
@pytest.mark.parametrize("kind", ["native", "io-delay"])
def test_x86_64_image_without_btf_boots(boot: Booter, tmp_path: Path, kind: str) -> None:
    """The same for Debian's 6.1 x86-64 image with its BTF removed: ops named from its
    release string, io_delay's target from its export table."""
    _kernel, rw = harness.patched_nobtf(tmp_path, kind)
    assert rw.plan.scan.ops is not None and "(release " in rw.plan.scan.ops.name
    counts = rw.plan.counts()
    if kind == "native":
        assert counts.get("inline", 0) >= 2000
    else:
        assert counts.get("call", 0) >= 100
        assert rw.plan.targets["native_io_delay"].source == "export table"
    _passed(boot(f"nobtf-{kind}"))


# -- read-back: the bytes the running kernel holds at each rewritten site (/proc/kcore) ----


def _read_back(result: harness.BootResult, rewrites: list[tuple[str, Rewrite]],
               expect: str, kernel: harness.Kernel = "6.1"
               ) -> tuple[int, list[str], dict[str, bytes]]:
    """Compare the guest's read-back of every site and thunk of `rewrites` (prefix,
    rewrite) with `expect`: "output" (pvpatch's bytes as the loader relocates them) or
    "predicted" (what the report says the kernel leaves there).  Returns (places compared,
    mismatches, label -> bytes read)."""
    bases = harness.section_bases(result.boot.reads, result.reads)
    compared, bad, seen = 0, [], {}
    for prefix, rw in rewrites:
        linked = not rw.plan.scan.elf.is_relocatable
        module = "-" if linked else harness.module_name(rw)
        mine = {sec: addr for (m, sec), addr in bases.items() if m == module}
        patches = {f"{prefix}/{p.decision.site.index}": p for p in rw.patches}
        cov = rw.plan.coverage
        for r in harness.reads_of(rw, prefix):
            hit = result.reads.get(r.label)
            assert isinstance(hit, tuple), f"{r.label}: {hit}"
            got = seen[r.label] = hit[1]
            p = patches.get(r.label)
            if expect == "predicted" and p is not None:
                want = cov.sites[p.decision.site.index].predicted
            elif linked:
                assert p is not None
                want = p.after
            else:
                want = harness.loaded_bytes(rw, r.section, r.offset, r.length, mine, kernel)
            compared += 1
            if got != want:
                bad.append(f"{r.label}: running kernel holds {got.hex()}, expected "
                           f"{want.hex() if want is not None else None}")
    return compared, bad, seen


def _changed_rw(kind: str, kernel: harness.Kernel = "6.1") -> list[tuple[str, Rewrite]]:
    return [(f"{kind}/{n}", rw) for n, _p, _d, rw in harness.variant(kind, kernel)
            if rw is not None and rw.changed]


@pytest.mark.qemu
def test_final_thunk_modules_run_pvpatch_bytes(boot: Booter) -> None:
    """--final with the thunk spec: the paravirt entry dropped, the ALT_NOT(XENPV) entry
    neutralised; the loaded modules hold pvpatch's thunk calls (relocated by the loader
    as pyelftools computes it) and pvpatch's thunks, and load and run."""
    rewrites = _changed_rw("final-thunk")
    assert sum(rw.neutralised_entries for _p, rw in rewrites) >= 12
    result = boot("final-thunk")
    _passed(result)
    compared, bad, got = _read_back(result, rewrites, "output")
    assert not bad, "\n".join(bad[:20])
    assert compared == len(result.boot.reads) >= 24
    calls = [v for k, v in got.items() if "/thunk/" not in k]
    assert calls and all(v[0] == 0xE8 for v in calls)  # call rel32: the thunk runs


@pytest.mark.qemu
def test_final_drop_thunk_modules_run_pvpatch_bytes(boot: Booter) -> None:
    """--final --drop-patched: both entries at each site are removed with their
    relocations (none neutralised); the modules load and hold pvpatch's bytes."""
    rewrites = _changed_rw("final-drop-thunk")
    sites = sum(1 for _p, rw in rewrites for p in rw.patches if p.decision.rewrites)
    assert sum(rw.dropped_entries for _p, rw in rewrites) == 2 * sites >= 24
    assert sum(rw.neutralised_entries for _p, rw in rewrites) == 0
    result = boot("final-drop-thunk")
    _passed(result)
    compared, bad, _got = _read_back(result, rewrites, "output")
    assert not bad, "\n".join(bad[:20])
    assert compared == len(result.boot.reads) >= 24


@pytest.mark.qemu
def test_thunk_modules_without_final_run_the_kernels_choice(boot: Booter) -> None:
    """Without --final the loader overwrites the thunk calls with the native replacement
    of the ALT_NOT(XENPV) entry: the read-back is what the report predicted, and is not
    pvpatch's output."""
    rewrites = _changed_rw("thunk")
    result = boot("thunk")
    _passed(result)
    compared, bad, got = _read_back(result, rewrites, "predicted")
    assert not bad, "\n".join(bad[:20])
    sites = {k: v for k, v in got.items() if "/thunk/" not in k}
    assert compared > len(sites) >= 12
    assert set(sites.values()) == {bytes.fromhex("9c580f1f4000")}  # pushf; pop %rax; nop
    for _prefix, rw in rewrites:
        cov = rw.plan.coverage
        assert all(cov.sites[p.decision.site.index].outcome == "native"
                   for p in rw.patches if p.decision.rewrites)


@pytest.mark.qemu
def test_native_modules_read_back_as_predicted(boot: Booter) -> None:
    """Native, table kept, no --final: the kernel re-applies its own entries; the report
    predicts it writes the very bytes pvpatch wrote, and the read-back agrees."""
    rewrites = _changed_rw("native")
    result = boot("native")
    _passed(result)
    compared, bad, _got = _read_back(result, rewrites, "predicted")
    assert not bad, "\n".join(bad[:20])
    assert compared >= 40
    compared, bad, _got = _read_back(result, rewrites, "output")
    assert not bad, "\n".join(bad[:20])


@pytest.mark.qemu
def test_final_native_vmlinux_boots_and_runs_pvpatch_bytes(boot: Booter) -> None:
    """The 6.1 image, native, --final: each rewritten site's .parainstructions entry is a
    copy of a kept one and its .altinstructions entry tests NOT ALWAYS; it boots, the
    --final native modules load on it, and every rewritten site (outside init sections)
    and module site holds pvpatch's bytes."""
    rw = harness.vmlinux_rewrite(final=True)
    rewritten = sum(1 for p in rw.patches if p.decision.rewrites)
    assert rw.copied_entries == rewritten >= 2000
    assert rw.neutralised_entries == rewritten
    result = boot("vmlinux-final")
    _passed(result)
    compared, bad, _got = _read_back(result, [("vmlinux", rw), *_changed_rw("final-native")],
                                     "output")
    assert not bad, "\n".join(bad[:20])
    assert compared == len(result.boot.reads) >= 2000


@pytest.mark.qemu
def test_612_native_modules_read_back_equal_output(boot: Booter) -> None:
    """6.12: the default already neutralises every entry at a rewritten site."""
    rewrites = _changed_rw("native", "6.12")
    result = boot("612-native")
    _passed(result)
    compared, bad, _got = _read_back(result, rewrites, "output", "6.12")
    assert not bad, "\n".join(bad[:20])
    assert compared >= 40


@pytest.mark.qemu
def test_612_native_vmlinux_read_back_equals_output(boot: Booter) -> None:
    rw = harness.vmlinux_rewrite("6.12")
    result = boot("612-vmlinux-native")
    _passed(result)
    compared, bad, _got = _read_back(result, [("vmlinux", rw)], "output", "6.12")
    assert not bad, "\n".join(bad[:20])
    assert compared >= 2000


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_guest_kernels_have_proc_kcore(kernel: harness.Kernel) -> None:
    """The read-back needs /proc/kcore: the booted kernels' own configs enable it."""
    boot_dir = harness.vmlinux(kernel).parent / "boot"
    (config,) = boot_dir.glob("config-*")
    assert "CONFIG_PROC_KCORE=y" in config.read_text().splitlines()


# -- i386 6.1: the read-back through an ELF32 /proc/kcore -----------------------------------


@pytest.mark.qemu
def test_i386_native_image_read_back_is_the_kernels_padding(boot: Booter,
                                                             tmp_path: Path) -> None:
    """No --final: the NOT XENPV alternatives overwrite each inline site with the same
    instruction padded by the i386 kernel's own NOPs (lea forms), as the report predicted,
    not pvpatch's nopl padding."""
    _kernel, rw = harness.patched_i386(tmp_path, "native")
    result = boot("i386-vmlinux-native")
    _passed(result)
    compared, bad, got = _read_back(result, [("vmlinux", rw)], "predicted")
    assert not bad, "\n".join(bad[:20])
    assert compared >= 40
    after = {f"vmlinux/{p.decision.site.index}": p.after for p in rw.patches}
    assert sum(got[k] != after[k] for k in got) >= 10  # the padding differs


@pytest.mark.qemu
def test_i386_final_image_runs_pvpatch_bytes(boot: Booter, tmp_path: Path) -> None:
    _kernel, rw = harness.patched_i386(tmp_path, "final")
    assert rw.copied_entries == rw.neutralised_entries == 53
    result = boot("i386-vmlinux-final")
    _passed(result)
    compared, bad, _got = _read_back(result, [("vmlinux", rw)], "output")
    assert not bad, "\n".join(bad[:20])
    assert compared == len(result.boot.reads) >= 40


@pytest.mark.qemu
def test_i386_io_delay_calls_are_the_kernels_own_choice(boot: Booter, tmp_path: Path) -> None:
    """No --final: apply_paravirt re-patches every io_delay site to a call to
    pv_ops.cpu.io_delay, which on this guest is native_io_delay: the very call pvpatch
    wrote (the report says the kernel re-patches them)."""
    _kernel, rw = harness.patched_i386(tmp_path, "io-delay")
    cov = rw.plan.coverage
    assert {cov.sites[p.decision.site.index].outcome for p in rw.patches
            if p.decision.rewrites} == {"kernel"}
    result = boot("i386-vmlinux-io-delay")
    _passed(result)
    compared, bad, _got = _read_back(result, [("vmlinux", rw)], "output")
    assert not bad, "\n".join(bad[:20])
    assert compared >= 100


# -- the running kernel's unwinder walks through an injected thunk (issue 16) --------------


def _site_returns(rw: Rewrite) -> dict[str, int]:
    """Function name -> offset in it of the return address of its call to the thunk (the
    frame the unwinder must find above the thunk), from the module's .symtab (pyelftools)."""
    import io

    from elftools.elf.elffile import ELFFile

    ef = ELFFile(io.BytesIO(rw.data))
    funcs = [s for s in ef.get_section_by_name(".symtab").iter_symbols()
             if s["st_info"]["type"] == "STT_FUNC" and isinstance(s["st_shndx"], int)]
    out = {}
    for p in rw.patches:
        site = p.decision.site
        if not p.decision.rewrites:
            continue
        shndx = next(i for i, sec in enumerate(ef.iter_sections()) if sec.name == site.section)
        (fn,) = [s for s in funcs if s["st_shndx"] == shndx
                 and s["st_value"] <= site.offset < s["st_value"] + s["st_size"]]
        out[fn.name] = site.offset + 5 - fn["st_value"]  # call rel32
    return out


def _kstacks(result: harness.BootResult, label: str
             ) -> tuple[dict[str, list[harness.Stack]], list[harness.Stack]]:
    """kstack's stacks of one boot: thunk place name -> its stacks, and the references."""
    rw = harness.variant_rewrite("final-thunk", harness.KSTACK_MODULE)
    (thunk,) = rw.thunks
    stacks = result.stacks[label]
    module = harness.module_name(rw)
    by_place = {name: [s for s in stacks
                       if s.place == f"{module}:{thunk.spec.symbol}+{off:#x}"]
                for name, off in harness.kstack_places(rw).items()}
    refs = [s for s in stacks if s.place in harness.KSTACK_REFERENCE]
    return by_place, refs


@pytest.mark.qemu
def test_kernel_unwinds_through_the_thunk(boot: Booter) -> None:
    """Breakpoints in aes_ti's thunk (its first instruction, and the one its callee
    native_save_fl returns to, where the unwinder uses the ORC entry it uses to step out of
    the callee) while the kernel self-tests cbc(aes-fixed-time): the running kernel's ORC
    unwinder names the thunk (kallsyms has its local symbol), finds the site's function at
    the call's return address, and walks on to the kernel thread's first frame
    (ret_from_fork), exactly the callers a stack taken in aes_encrypt (called from the same
    frame, no thunk involved) has; no unwinder warning."""
    rw = harness.variant_rewrite("final-thunk", harness.KSTACK_MODULE)
    (thunk,) = rw.thunks
    returns = _site_returns(rw)
    assert set(returns) == {"aesti_encrypt", "aesti_decrypt"}
    result = boot("final-thunk")
    _passed(result)
    label = "final-thunk/kstack"
    assert result.loads[label].startswith("fail")  # tcrypt never stays loaded (EAGAIN)
    by_place, refs = _kstacks(result, label)
    module = harness.module_name(rw)
    # the references: <- aesti_{en,de}crypt <- crypto_cbc_* ... <- ret_from_fork
    tails = {}
    for ref in refs:
        assert ref.frames[1].symbol in returns and ref.frames[1].module == module, ref
        assert ref.frames[-1].symbol == "ret_from_fork", ref
        tails.setdefault(ref.frames[1].symbol, set()).add(
            tuple(f.address for f in ref.frames[2:]))
    assert set(tails) == set(returns)
    for place, offset in harness.kstack_places(rw).items():
        stacks = by_place[place]
        assert {s.frames[1].symbol for s in stacks} == set(returns), (place, stacks)
        for s in stacks:
            shown = " <- ".join(map(str, s.frames))
            top, caller = s.frames[0], s.frames[1]
            assert (top.symbol, top.offset, top.module) == (thunk.spec.symbol, offset,
                                                            module), shown
            assert (caller.offset, caller.module) == (returns[caller.symbol], module), shown
            assert "?" not in s.names() and s.names()[-1] == "ret_from_fork", shown
            # the thunk's frame is the only difference from the stack without it
            assert tuple(f.address for f in s.frames[2:]) in tails[caller.symbol], shown
    assert sum(s.hits for stacks in by_place.values() for s in stacks) >= 100


def test_orc_off_by_one_changes_the_entry_the_callee_returns_into() -> None:
    rw = harness.variant_rewrite("final-thunk", harness.KSTACK_MODULE)
    (thunk,) = rw.thunks
    ret = harness.kstack_places(rw)["return"]
    code = rw.data  # the thunk's bytes, through its section in the output
    elf = pvpatch.elf.reader.ElfFile(code)
    sec = elf.section(thunk.section)
    assert sec is not None
    body = elf.section_data(sec)[thunk.offset : thunk.offset + thunk.size]
    assert body[ret - 5] == 0xE8  # call rel32 just before the return place
    data, entry = harness.orc_off_by_one(rw)
    before = harness.thunk_orc(rw.data, thunk.spec.symbol)
    after = harness.thunk_orc(data, thunk.spec.symbol)
    # the entry in force at ret - 1 (ORC's lookup for a return address): pushes of 8
    # registers, the lea of 8 and the return address make sp+80; now sp+88
    assert entry.offset <= ret - 1 < min(e.offset for e in before if e.offset > entry.offset)
    assert entry.sp_offset == 80
    assert [(e.offset, e.sp_offset + 8 * (e.index == entry.index)) for e in before] == \
        [(e.offset, e.sp_offset) for e in after]


@pytest.mark.qemu
def test_kernel_unwind_stops_at_a_thunk_whose_orc_entry_is_off_by_one(boot: Booter) -> None:
    """The negative control: the same aes_ti with the ORC entry in force where the callee
    returns stating one push too many.  From there the kernel's unwinder reads the return
    address from the wrong slot and the stack ends at the thunk; from the thunk's first
    instruction (its entry left right) it still reaches ret_from_fork.  So the stacks above
    are the kernel reading pvpatch's entries, not a lucky guess."""
    result = boot("kstack-orc-off-by-one")
    _passed(result)
    by_place, refs = _kstacks(result, "kstack-orc-off-by-one/kstack")
    assert refs and all(r.names()[-1] == "ret_from_fork" for r in refs)
    assert by_place["return"] and all(len(s.frames) == 1 for s in by_place["return"])
    assert by_place["entry"] and all(s.names()[-1] == "ret_from_fork"
                                     for s in by_place["entry"])


# -- a stack dump taken inside the thunk's callee (tests/qemu/pvq, issue 16) ---------------

OBJTOOL = Path("/usr/lib/linux-kbuild-6.1/tools/objtool/objtool")


def _objtool_orc(data: bytes, symbol: str, tmp_path: Path) -> list[tuple[int, str]]:
    """(offset, "sp:...") of each ORC entry objtool --dump=orc lists inside `symbol`."""
    path = tmp_path / "dump.ko"
    path.write_bytes(data)
    out = subprocess.run([str(OBJTOOL), "--dump=orc", str(path)], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        where, _sep, rest = line.partition(": ")
        name, _plus, off = where.rpartition("+")
        if name == symbol:
            rows.append((int(off, 16), rest.split()[0]))
    return rows


def test_pvq_is_built_against_debians_headers_and_gets_an_orc_covered_thunk(
        tmp_path: Path) -> None:
    """tests/qemu/pvq, built with Debian's headers and kbuild, carries the kernel's vermagic
    and one irq.save_fl site in pvq_site; PVQ_SPEC sends it through a thunk to pvq_save_fl,
    a function of the module itself, and the thunk has an ORC entry at each stack change
    (pyelftools and objtool read the same ones)."""
    path = harness.pvq_module()
    aes_ti = harness.module_paths()["aes_ti"]
    vermagic = pvpatch.open_elf(path).modinfo()["vermagic"]
    assert vermagic == pvpatch.open_elf(aes_ti).modinfo()["vermagic"]
    rw = harness.pvq_rewrite()
    sites = [p.decision.site for p in rw.patches]
    assert [(s.op, s.section) for s in sites] == [("irq.save_fl", ".text")]
    assert _site_returns(rw) == {harness.PVQ_SITE: 0xA}  # after `call __fentry__`; call
    (thunk,) = rw.thunks
    assert thunk.spec.target == harness.PVQ_CALLEE
    elf = pvpatch.elf.reader.ElfFile(rw.data)
    callee = [s for s in elf.symbols if s.name == harness.PVQ_CALLEE]
    assert len(callee) == 1 and callee[0].shndx != 0  # defined in pvq, not imported
    assert rw.neutralised_entries + rw.dropped_entries >= 1  # --final: the kernel keeps it
    mine = harness.thunk_orc(rw.data, thunk.spec.symbol)
    # push x8, lea -8, call, lea +8, pop x8, jmp: 8..80 and back, then the end entry
    defined = [(e.offset, f"sp:sp+{e.sp_offset}") for e in mine[:-1]]
    assert [sp for _o, sp in defined] == [f"sp:sp+{8 * n}" for n in
                                          (*range(1, 11), *range(9, 0, -1))]
    assert mine[-1].offset == thunk.size
    if OBJTOOL.is_file():
        theirs = _objtool_orc(rw.data, thunk.spec.symbol, tmp_path)
        assert theirs[:-1] == defined and theirs[-1] == (thunk.size, "sp:(und)")


def _pvq_dumps(result: harness.BootResult, tag: str) -> tuple[list[harness.Dump], int]:
    """pvq's dumps under `tag` and the address of its init function (which it prints)."""
    dumps = result.dumps.get(tag, [])
    inits = {int(m, 16) for m in
             (ln.rsplit("init=", 1)[1] for ln in result.lines(rf"PVQ-SAVEFL {tag} "))}
    assert len(inits) == 1, result.lines("PVQ-SAVEFL")
    # busybox insmod runs init through finit_module, then (refused) through init_module
    assert 1 <= len(dumps) == len(result.lines(rf"PVQ-SAVEFL {tag} ")) <= 2, \
        [str(d) for d in dumps]
    return dumps, inits.pop()


@pytest.mark.qemu
def test_stack_dump_in_the_thunks_callee_walks_through_the_thunk(boot: Booter) -> None:
    """dump_stack() inside pvq_save_fl, the C function pvq's paravirt site reaches through
    pvpatch's thunk: the kernel's ORC unwinder steps from the callee into the thunk (named,
    at the instruction after its call), then to the site's function at the return address
    of its call to the thunk, to the init function, do_one_initcall and on to the system
    call entry (the user registers follow).  Every frame is a reliable one: the "? " lines
    between them are only pvq_init's own address, left in a register the thunk saved (it
    names no function); no unwinder warning anywhere in the boot."""
    rw = harness.pvq_rewrite()
    (thunk,) = rw.thunks
    result = boot("final-thunk")
    _passed(result)  # includes: no "WARNING:" line, no Call Trace outside pvq's dumps
    assert result.loads["final-thunk/pvq"].startswith("fail 11")  # -EAGAIN, by design
    dumps, init = _pvq_dumps(result, harness.PVQ_TAGS[0])
    chain = ["dump_stack_lvl", harness.PVQ_CALLEE, thunk.spec.symbol, harness.PVQ_SITE,
             harness.PVQ_INIT, "do_one_initcall", "do_init_module"]
    places = {thunk.spec.symbol: harness.kstack_places(rw)["return"],
              **_site_returns(rw)}
    for dump in dumps:
        shown = str(dump)
        walk = dump.walk()
        assert walk[: len(chain)] == chain, shown
        assert walk[len(chain)] in ("__do_sys_finit_module", "__do_sys_init_module"), shown
        assert walk[-2:] == ["do_syscall_64", "entry_SYSCALL_64_after_hwframe"], shown
        assert any("RIP: 0033:" in ln for ln in dump.lines), shown  # user mode's registers
        lines = list(dump.trace)
        first = next(i for i, t in enumerate(lines) if t.symbol == harness.PVQ_CALLEE)
        last = next(i for i, t in enumerate(lines) if t.symbol == "do_one_initcall")
        for t in lines[first:last]:
            if not t.reliable:
                assert t.symbol is None and t.value == init, shown
            elif t.symbol in places:
                assert (t.offset, t.module) == (places[t.symbol], "pvq"), shown
            else:
                assert t.module == "pvq" or t.symbol == "do_one_initcall", shown
        assert not [ln for ln in dump.lines if "WARNING" in ln or "unwind" in ln], shown


@pytest.mark.qemu
def test_stack_dump_through_a_thunk_whose_orc_entry_is_off_by_one_loses_the_site(
        boot: Booter) -> None:
    """The control, in the same boot: pvq with the thunk's ORC entry at its callee's
    return address stating one push too many.  Stepping out of the thunk, the unwinder
    reads the slot above the real return address: pvq_site's own return into pvq_init.
    pvq_site drops out of the walk and shows up only as a "? " line found by the stack
    scan, so the dump above is the kernel reading pvpatch's entries, not a lucky scan."""
    rw = harness.pvq_rewrite()
    (thunk,) = rw.thunks
    _data, entry = harness.orc_off_by_one(rw)
    assert entry.sp_offset == 80
    result = boot("final-thunk")
    _passed(result)
    dumps, _init = _pvq_dumps(result, harness.PVQ_TAGS[1])
    for dump in dumps:
        shown = str(dump)
        walk = dump.walk()
        assert harness.PVQ_SITE not in walk, shown
        assert walk[:5] == ["dump_stack_lvl", harness.PVQ_CALLEE, thunk.spec.symbol,
                            harness.PVQ_INIT, "do_one_initcall"], shown
        assert any(not t.reliable and t.symbol == harness.PVQ_SITE for t in dump.trace), shown
