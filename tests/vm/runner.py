"""Run one command as root inside a throw-away QEMU VM booted from Debian's stock kernel.

This is the kernel VM tier (`make kernel`). The machines we develop on run a kernel without
ipvlan, dummy, 802.1q and netdevsim; Debian's `linux-image-amd64` (6.1) has them. The VM sees
the host's root file system read-only over 9p (writes land in tmpfs overlays that vanish with
it), the current directory read-write at the same path, and the caller's exported environment.
It loads the configured modules, runs the command in the same directory, streams the command's
stdout and stderr (merged) to our stdout as they arrive, and hands back its exit code:

    python -m tests.vm.runner [--timeout S] -- CMD ARGS...    # as root, from the repo root

    exit code: the command's own; 124 on timeout; 125 when the VM gave no result

The VM has no network card, so nothing in it can reach the host's network. What the runner
builds (an initramfs with busybox and the modules, an uncompressed vmlinux, netdevsim.ko, which
Debian's kernel lacks, compiled from linux-source-6.1) is cached under ~/.cache/plexus-vm, keyed
by the kernel version and its inputs. Knobs are PLEXUS_VM_* environment variables, listed in
tests/vm/README.md.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import lzma
import os
import re
import selectors
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal, TypeVar

EXIT_TIMEOUT = 124
EXIT_NO_RESULT = 125
# What the kernel tier's tests create. Names resolve through modules.dep; an entry with a "/" is
# the path of an out-of-tree .ko. Debian builds netdevsim out (CONFIG_NETDEVSIM is not set): the
# runner compiles it once from linux-source-6.1 and loads it by path (see netdevsim_ko).
DEFAULT_MODULES = ("veth", "macvlan", "ipvlan", "dummy", "8021q", "vxlan", "bridge", "netdevsim")
# What stage 1 needs to mount the host's file systems: virtio-mmio is microvm's transport,
# virtio-pci q35's. Loaded first.
BOOT_MODULES = ("virtio_mmio", "virtio_pci", "9pnet_virtio", "9p", "overlay")
DEFAULT_TIMEOUT = 1800.0
# A boot reaches stage 2 in ~5 s under TCG; about 1 boot in 350 stalls before userspace and
# never recovers, so the watchdog kills it and boots again (the command had not started).
DEFAULT_BOOT_TIMEOUT = 40.0
DEFAULT_BOOT_RETRIES = 2
POWEROFF_GRACE = 10.0  # seconds from the command's exit code to QEMU's exit before we kill it
STALE_AFTER = 3600.0  # cached initramfs images unused this long are pruned after a rebuild
XZ_MAGIC = b"\xfd7zXZ\x00"
KERNEL_SOURCE = Path("/usr/src/linux-source-6.1.tar.xz")
BUILD_TIMEOUT = 900.0  # seconds for one step of the netdevsim build (make takes ~10 s here)
BUILD_LOG_TAIL = 25  # lines of a failed step's output quoted in the reason
PT_INTERP = 3
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The host's identity, terminal session and temp dir mean nothing in the guest.
_HOST_ONLY_ENV = re.compile(r"HOSTNAME|PWD|OLDPWD|SHLVL|DISPLAY|TMPDIR|_|(SSH|XDG|DBUS)_\w*")

Outcome = Literal["exited", "stalled", "timeout"]
_N = TypeVar("_N", int, float)


class VmError(Exception):
    """The VM could not be set up, or it ended without a result (exit code 125)."""


class ModuleUnavailable(VmError):
    """A module the kernel lacks could not be built: the VM boots without it, and the tests
    that need it fail there with this reason (PLEXUS_VM_MISSING)."""


def log(message: str) -> None:
    print(f"plexus-vm: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class Settings:
    kver: str
    modules: tuple[str, ...]
    cache: Path
    accel: str
    machine: str
    mem: str
    cpus: int
    timeout: float
    boot_timeout: float
    boot_retries: int
    debug: bool
    append: str

    @classmethod
    def load(cls, environ: Mapping[str, str], timeout: float | None) -> Settings:
        def knob(name: str, default: str) -> str:
            return environ.get(f"PLEXUS_VM_{name}") or default

        cache_home = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        settings = cls(
            kver=knob("KVER", "") or newest_kernel(),
            modules=tuple(knob("MODULES", " ".join(DEFAULT_MODULES)).replace(",", " ").split()),
            cache=Path(knob("CACHE", f"{cache_home}/plexus-vm")),
            accel=knob("ACCEL", "") or default_accel(),
            machine=knob("MACHINE", "microvm"),
            mem=knob("MEM", "1G"),
            cpus=_number(knob("CPUS", str(len(os.sched_getaffinity(0)))), int),
            timeout=timeout or _number(knob("TIMEOUT", str(DEFAULT_TIMEOUT)), float),
            boot_timeout=_number(knob("BOOT_TIMEOUT", str(DEFAULT_BOOT_TIMEOUT)), float),
            boot_retries=_number(knob("BOOT_RETRIES", str(DEFAULT_BOOT_RETRIES)), int),
            debug=knob("DEBUG", "0") == "1",
            append=knob("APPEND", ""),
        )
        if settings.accel not in {"tcg", "kvm"} or settings.machine not in {"microvm", "q35"}:
            raise VmError("PLEXUS_VM_ACCEL is tcg|kvm and PLEXUS_VM_MACHINE is microvm|q35")
        return settings


def _number(text: str, kind: Callable[[str], _N]) -> _N:
    try:
        return kind(text)
    except ValueError:
        raise VmError(f"not a number: {text!r}") from None


def newest_kernel() -> str:
    versions = [p.name.removeprefix("vmlinuz-") for p in Path("/boot").glob("vmlinuz-6.1.*")]
    if not versions:
        raise VmError("no /boot/vmlinuz-6.1.*: apt-get install linux-image-amd64")
    return max(versions, key=_version_key)


def _version_key(version: str) -> list[int | str]:
    """Compare the numbers in "6.1.0-9" and "6.1.0-10" as numbers."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", version)]


def default_accel() -> str:
    """KVM only when it is a hardware KVM: on hosts whose /dev/kvm is the paravirtual kvm_pvm
    flavour (ours), a stock guest kernel hangs right after decompression."""
    sysmod = Path("/sys/module")
    hardware = (sysmod / "kvm_intel").exists() or (sysmod / "kvm_amd").exists()
    if os.access("/dev/kvm", os.W_OK) and hardware and not (sysmod / "kvm_pvm").exists():
        return "kvm"
    return "tcg"


# ------------------------------------------------------------------------------------- modules


def module_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")


def resolve_modules(moddir: Path, wanted: Sequence[str]) -> list[Path]:
    """The .ko files for `wanted` and everything they depend on, dependencies first. Built-in
    modules need no file and are left out."""
    index: dict[str, tuple[Path, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, deps = line.partition(":")
        index[module_name(path)] = (moddir / path, [module_name(d) for d in deps.split()])
    builtin = {module_name(p) for p in (moddir / "modules.builtin").read_text().split()}
    for entry in wanted:
        if "/" in entry:  # an out-of-tree module, by path
            index[module_name(entry)] = (Path(entry), _modinfo_depends(Path(entry)))
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order or name in builtin:
            return
        if name not in index:
            raise VmError(f"kernel {moddir.name} has no module {name}")
        for dep in index[name][1]:
            visit(dep)
        order.append(name)

    for entry in wanted:
        visit(module_name(entry))
    return [index[name][0] for name in order]


def _modinfo_depends(path: Path) -> list[str]:
    if not path.is_file():
        raise VmError(f"no module file {path}")
    out = subprocess.run(
        ["modinfo", "-F", "depends", str(path)], check=False, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise VmError(f"modinfo {path}: {out.stderr.strip()}")
    return [module_name(d) for d in out.stdout.strip().split(",") if d]


def module_bytes(path: Path) -> bytes:
    # busybox insmod wants a plain ELF object; Debian's 6.1 ships plain .ko, later kernels
    # compress them.
    if path.suffix == ".xz":
        return lzma.decompress(path.read_bytes())
    if path.suffix == ".gz":
        return gzip.decompress(path.read_bytes())
    if path.suffix == ".zst":
        return subprocess.run(["zstd", "-qdc", str(path)], capture_output=True, check=True).stdout
    return path.read_bytes()


# ----------------------------------------------------------------------------------- initramfs

# Both stages run under the static busybox and its applets (mount, cat, stty, ...), even the
# second one in the host's root: under TCG every exec of a dynamically linked host binary (the
# loader, then its libraries over 9p) costs 0.1-0.2 s.

# Stage 1, from the initramfs: load the modules; mount the host's root read-only with writable
# tmpfs overlays, the control dir and the caller's directory; hand over to stage 2.
STAGE1 = r"""#!/bin/sh
/bin/busybox --install -s /bin
fail() { echo "plexus-vm stage 1: $*"; echo b >/proc/sysrq-trigger; }
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in /mod/*.ko; do insmod "$m" || echo "plexus-vm: insmod ${m#/mod/} failed"; done
o=trans=virtio,version=9p2000.L,msize=512000,access=any
R=/newroot
# The host's root does not change under a run: let the guest cache it.
mount -t 9p -o "$o,ro,cache=loose" hostroot $R || fail "cannot mount the host's root"
mount -t tmpfs -o mode=755 run $R/run
mkdir -p $R/run/vmctl $R/run/plexus-vm/bin $R/run/plexus-vm/ovl
busybox --install -s $R/run/plexus-vm/bin  # links to /bin/busybox, the host's one there too
mount -t 9p -o "$o" vmctl $R/run/vmctl || fail "cannot mount the control dir"
# /run is a fresh tmpfs (ip netns mounts there); writable throw-away views of the rest:
for d in etc root var tmp home; do
    [ -d $R/$d ] || continue
    u=$R/run/plexus-vm/ovl/$d
    mkdir -p $u/upper $u/work
    mount -t overlay -o lowerdir=$R/$d,upperdir=$u/upper,workdir=$u/work ovl-$d $R/$d
done
mount -t proc proc $R/proc; mount -t sysfs sys $R/sys; mount -t devtmpfs dev $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o ptmxmode=666 devpts $R/dev/pts; mount -t tmpfs shm $R/dev/shm
mount -t debugfs debugfs $R/sys/kernel/debug 2>/dev/null
cwd=$(cat $R/run/vmctl/cwd)
mkdir -p "$R$cwd" 2>/dev/null  # only needed (and possible) under /run, /tmp, ...
# Cached too, though read-write: it halves Python's start-up (imports from the project's .venv)
# at the price of not seeing the host's own changes during a run. Stage 2 syncs the guest's.
mount -t 9p -o "$o,cache=loose" hostcwd "$R$cwd" || fail "cannot mount $cwd"
umount /proc /sys /dev
exec switch_root $R /bin/busybox sh /run/vmctl/stage2.sh
"""

# Stage 2, in the host's root: "booted" tells the watchdog that the boot is done; the exit code
# is written only once all output has left the serial line. Only the command's subshell gets the
# caller's environment (and PATH); cmd.sh names the program by path, so busybox runs the host's
# program and not an applet of the same name.
STAGE2 = r"""export PATH=/run/plexus-vm/bin
ctl=/run/vmctl
: >$ctl/booted
# Plain "\n" on the serial line: the host's terminal adds its own "\r" where it needs one.
stty -F /dev/console -onlcr
[ -e $ctl/winsize ] && stty -F /dev/console $(cat $ctl/winsize)
hostname vm
ip link set lo up
cd "$(cat $ctl/cwd)" || exit 1
if [ -e $ctl/tty ]; then
    (. $ctl/env.sh; . $ctl/cmd.sh) </dev/null; echo $? >$ctl/rc.part
else
    # The host's stdout is no terminal: neither is the command's (no colours, no progress bars).
    { (. $ctl/env.sh; . $ctl/cmd.sh) </dev/null 2>&1; echo $? >$ctl/rc.part; } | cat
fi
# Wait until the console has sent everything: coreutils' stty applies settings with TCSADRAIN
# (busybox's with TCSANOW), and ~0.1 s is cheap for never losing the tail of the output.
/bin/stty -F /dev/console -onlcr
sync  # the guest's writes to the caller's directory reach the host before the exit code does
mv $ctl/rc.part $ctl/rc
# reboot(2) ends QEMU silently (sysrq would print "Resetting" on the console).
reboot -f
"""


class Cpio:
    """A minimal writer of the "newc" cpio format, the one the kernel unpacks as initramfs. It
    lets us add /dev/console without mknod and keeps the image byte-for-byte reproducible."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 0

    def directory(self, name: str) -> None:
        self._add(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._add(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._add(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._add(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._add("TRAILER!!!", 0)
        return bytes(self._out)

    def _add(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        self._ino += 1
        # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(name) + 1, 0)
        self._out += b"070701" + "".join(f"{f:08x}" for f in fields).encode()
        self._out += name.encode() + b"\0"
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)


def static_busybox() -> Path:
    path = Path("/bin/busybox")
    if not path.is_file() or _has_interpreter(path):
        raise VmError("a static /bin/busybox is needed: apt-get install busybox-static")
    return path


def _has_interpreter(elf: Path) -> bool:
    """Whether an ELF64 executable names a dynamic loader (a PT_INTERP program header)."""
    with elf.open("rb") as f:
        head = f.read(64)
        if head[:5] != b"\x7fELF\x02":
            return True  # not a 64-bit ELF: not the static busybox we need either
        (phoff,) = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == PT_INTERP for i in range(phnum))


def build_initramfs(busybox: Path, modules: Sequence[Path]) -> bytes:
    cpio = Cpio()
    for name in ("bin", "dev", "proc", "sys", "newroot", "mod"):
        cpio.directory(name)
    cpio.file("bin/busybox", busybox.read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for init before anything is mounted
    for i, path in enumerate(modules):
        # numbered so that stage 1's "/mod/*.ko" glob loads them in dependency order
        cpio.file(f"mod/{i:03d}-{module_name(str(path))}.ko", module_bytes(path))
    cpio.file("init", STAGE1.encode(), 0o755)
    return cpio.finish()


# ------------------------------------------------------------------------------------- caching


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """One builder at a time: parallel runs wait for the first one's cache instead of racing."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def write_atomic(dest: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fingerprint(*parts: bytes | Path) -> str:
    """A short digest of byte strings and files (files by size and mtime: cheap, and a package
    upgrade changes both)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            st = part.stat()
            digest.update(f"{part}:{st.st_size}:{st.st_mtime_ns}".encode())
        else:
            digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def boot_image(s: Settings) -> Path:
    """The kernel to boot: an uncompressed vmlinux extracted once from the bzImage when that
    works (it saves ~3.5 s of decompression per boot under TCG), else the bzImage."""
    bzimage = Path(f"/boot/vmlinuz-{s.kver}")
    if not bzimage.is_file():
        raise VmError(f"no {bzimage}")
    dest = s.cache / f"vmlinux-{s.kver}-{fingerprint(bzimage)}"
    if not dest.exists():
        vmlinux = extract_vmlinux(bzimage.read_bytes())
        if vmlinux is None:
            return bzimage
        write_atomic(dest, vmlinux)
    return dest


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    # Debian's bzImage is an xz stream behind a small boot stub. The ELF inside carries a PVH
    # entry note (CONFIG_PVH=y), so QEMU's -kernel boots it directly.
    at = bzimage.find(XZ_MAGIC)
    if at < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(bzimage[at:])
    except lzma.LZMAError:
        return None
    return elf if elf.startswith(b"\x7fELF") else None


def module_dir(s: Settings) -> Path:
    moddir = Path("/lib/modules") / s.kver
    if not (moddir / "modules.dep").is_file():
        raise VmError(f"no {moddir}/modules.dep: apt-get install linux-image-{s.kver}")
    return moddir


def initramfs(s: Settings, wanted: Sequence[str]) -> Path:
    moddir = module_dir(s)
    busybox = static_busybox()
    modules = resolve_modules(moddir, (*BOOT_MODULES, *wanted))
    key = fingerprint(Path(__file__).read_bytes(), s.kver.encode(), busybox, *modules)
    dest = s.cache / f"initrd-{s.kver}-{key}.cpio"
    if dest.exists():
        dest.touch()  # in use: keep it out of the pruning below
        return dest
    log(f"building the initramfs for {s.kver} (once per kernel and runner version)")
    write_atomic(dest, build_initramfs(busybox, modules))
    # Older images belong to earlier versions of this file or other module lists. Only long
    # unused ones go: a parallel run may be about to boot (or reboot) from its own.
    for old in s.cache.glob("initrd-*.cpio"):
        if old != dest and time.time() - old.stat().st_mtime > STALE_AFTER:
            old.unlink(missing_ok=True)
    return dest


# ------------------------------------------------------------------ netdevsim, built out of tree


def loadable_modules(s: Settings, moddir: Path) -> tuple[list[str], dict[str, str]]:
    """The configured modules, with netdevsim as the path of our own build when the kernel lacks
    it. One that cannot be built is left out with the reason, so the rest of the tier still
    runs and the tests that need it fail with that reason instead of all of them failing."""
    wanted: list[str] = []
    missing: dict[str, str] = {}
    for entry in s.modules:
        if entry != "netdevsim" or kernel_ships(moddir, entry):
            wanted.append(entry)
            continue
        try:
            wanted.append(str(netdevsim_ko(s, moddir)))
        except ModuleUnavailable as exc:
            log(f"booting without netdevsim (tests that need it will fail): {exc}")
            missing[entry] = str(exc)
    return wanted, missing


def kernel_ships(moddir: Path, name: str) -> bool:
    listed = (moddir / "modules.dep").read_text().splitlines()
    listed += (moddir / "modules.builtin").read_text().split()
    return any(module_name(line.partition(":")[0]) == name for line in listed)


def netdevsim_ko(s: Settings, moddir: Path) -> Path:
    """netdevsim.ko for `s.kver`, built once from Debian's linux-source-6.1 against the kernel's
    headers and cached, keyed by the kernel version and both inputs. The caller holds
    cache_lock: a parallel run waits for this build instead of racing it."""
    headers = moddir / "build"
    check_build_inputs(s.kver, headers)
    key = fingerprint(KERNEL_SOURCE, headers / "Module.symvers")
    dest = s.cache / f"netdevsim-{s.kver}-{key}.ko"
    if dest.exists():
        return dest
    log(f"building netdevsim.ko for {s.kver} from {KERNEL_SOURCE} (once per kernel)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".netdevsim-", dir=s.cache) as work:
        # Built aside and renamed into place: a killed build never leaves a half-written .ko.
        os.replace(build_netdevsim(Path(work), headers), dest)
    log(f"netdevsim.ko built in {time.monotonic() - started:.1f} s: {dest}")
    for old in s.cache.glob(f"netdevsim-{s.kver}-*.ko"):
        if old != dest:  # from older sources or headers; images built from it hold a copy
            old.unlink(missing_ok=True)
    return dest


def check_build_inputs(kver: str, headers: Path) -> None:
    if not KERNEL_SOURCE.is_file():
        raise ModuleUnavailable(f"no {KERNEL_SOURCE}: apt-get install linux-source-6.1")
    if not (headers / "Makefile").is_file():
        raise ModuleUnavailable(
            f"no kernel headers for {kver} in {headers}: apt-get install linux-headers-{kver}"
        )
    absent = [tool for tool in ("tar", "xz", "make", "gcc", "strip") if not shutil.which(tool)]
    if absent:
        raise ModuleUnavailable(
            f"no {', '.join(absent)} to build netdevsim: apt-get install xz-utils make gcc"
        )


def build_netdevsim(work: Path, headers: Path) -> Path:
    # Only the driver's directory comes out of the 140 MB tarball (the whole xz stream is still
    # read: ~8 s); "*" must not cross "/", or the selftests' drivers/net/netdevsim/ match too.
    member = "linux-source-*/drivers/net/netdevsim/*"
    untar = ["tar", "-xJf", str(KERNEL_SOURCE), "-C", str(work), "--strip-components=4"]
    build_step(
        "extracting its sources", [*untar, "--wildcards", "--no-wildcards-match-slash", member]
    )
    if not (work / "Makefile").is_file():
        raise ModuleUnavailable(f"{KERNEL_SOURCE} has no drivers/net/netdevsim/")
    # CONFIG_NETDEVSIM=m switches the driver on for kbuild; the rest of the configuration (BPF,
    # PSAMPLE, ...) comes from the headers, so the module matches the kernel it loads into.
    jobs = f"-j{len(os.sched_getaffinity(0))}"
    build_step("make", ["make", "-C", str(headers), f"M={work}", "CONFIG_NETDEVSIM=m", jobs])
    ko = work / "netdevsim.ko"
    # Debug info is 5.5 of its 5.7 MB: stripped, it is a small part of every initramfs.
    build_step("strip", ["strip", "--strip-debug", str(ko)])
    return ko


def build_step(what: str, argv: Sequence[str]) -> None:
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModuleUnavailable(f"building it: {what} took over {BUILD_TIMEOUT:g} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-BUILD_LOG_TAIL:])
        raise ModuleUnavailable(
            f"building it: {what} failed (exit {done.returncode}): {shlex.join(argv)}\n{tail}"
        )


# ---------------------------------------------------------------------------------- control dir


@contextmanager
def control_dir(
    s: Settings, command: Sequence[str], cwd: Path, missing: Mapping[str, str]
) -> Iterator[Path]:
    """The per-run directory shared with the guest (as /run/vmctl): what to run and where, and
    what the guest reports back (`booted`, `rc`). Removed at the end; dirs of runs that were
    killed before they could remove their own are removed by the next run."""
    runs = s.cache / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    _remove_dead_runs(runs)
    ctl = Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=runs))
    try:
        write_control_files(ctl, command, cwd, os.environ, missing)
        yield ctl
    finally:
        shutil.rmtree(ctl, ignore_errors=True)


def _remove_dead_runs(runs: Path) -> None:
    for old in runs.iterdir():
        pid = old.name.partition("-")[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)


def write_control_files(
    ctl: Path,
    command: Sequence[str],
    cwd: Path,
    environ: Mapping[str, str],
    missing: Mapping[str, str],
) -> None:
    tty = sys.stdout.isatty()
    (ctl / "cwd").write_text(str(cwd))
    (ctl / "env.sh").write_text(env_script(environ, tty=tty, missing=missing))
    (ctl / "cmd.sh").write_text(f"exec {shlex.join(command_by_path(command, environ))}\n")
    (ctl / "stage2.sh").write_text(STAGE2)
    if tty:
        (ctl / "tty").touch()
        size = os.get_terminal_size(sys.stdout.fileno())
        (ctl / "winsize").write_text(f"rows {size.lines} cols {size.columns}\n")


def command_by_path(command: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    """CMD with its program as a path, looked up in the caller's PATH here: the guest sees the
    same files, and a bare name there would run busybox's applet of that name (ip, ping, ...)."""
    program = command[0]
    if "/" not in program:
        program = shutil.which(program, path=environ.get("PATH")) or program
    return [program, *command[1:]]


def env_script(
    environ: Mapping[str, str], *, tty: bool, missing: Mapping[str, str] | None = None
) -> str:
    """The caller's exported environment as shell, so PATH, VIRTUAL_ENV and the like work the
    same inside. TERM only travels when the output goes to a terminal. `missing` names the
    modules left out and why: tests that need one fail with that reason (PLEXUS_VM_MISSING)."""
    lines = [
        f"export {name}={shlex.quote(value)}"
        for name, value in sorted(environ.items())
        if _ENV_NAME.fullmatch(name)
        and not _HOST_ONLY_ENV.fullmatch(name)
        and (tty or name != "TERM")
    ]
    lines.append("export VM=1 PLEXUS_VM=1")  # tests can tell they run inside
    if missing:
        why = "; ".join(f"{name}: {reason}" for name, reason in sorted(missing.items()))
        lines.append(f"export PLEXUS_VM_MISSING={shlex.quote(why)}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- qemu


def qemu_argv(s: Settings, kernel: Path, initrd: Path, ctl: Path, cwd: Path) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise VmError("no qemu-system-x86_64: apt-get install qemu-system-x86")
    transport = "device" if s.machine == "microvm" else "pci"  # virtio-mmio or virtio-pci
    # setpriv: the kernel kills QEMU if this runner dies, even by SIGKILL, when no finally runs.
    argv = ["setpriv", "--pdeathsig", "KILL", "--", qemu, "-nodefaults", "-no-user-config"]
    argv += ["-display", "none", "-no-reboot", "-nic", "none", "-machine", s.machine]
    argv += ["-m", s.mem, "-smp", str(s.cpus), *_accel_args(s.accel), "-serial", "stdio"]
    argv += ["-kernel", str(kernel), "-initrd", str(initrd), "-append", kernel_cmdline(s)]
    shares = (("hostroot", Path("/"), ",readonly=on"), ("vmctl", ctl, ""), ("hostcwd", cwd, ""))
    for tag, path, extra in shares:
        escaped = str(path).replace(",", ",,")  # QEMU's option syntax
        argv += ["-fsdev", f"local,id={tag},path={escaped},security_model=none"]
        argv[-1] += f",multidevs=remap{extra}"  # / spans several file systems: no inode clashes
        argv += ["-device", f"virtio-9p-{transport},fsdev={tag},mount_tag={tag}"]
    return argv


def _accel_args(accel: str) -> list[str]:
    if accel == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def kernel_cmdline(s: Settings) -> str:
    # panic=-1 and reboot=t with QEMU's -no-reboot: a panic or the final reboot ends QEMU (a
    # triple fault works on microvm, which has no keyboard controller to reset through).
    args = ["console=ttyS0", "rdinit=/init", "panic=-1", "reboot=t", "mitigations=off"]
    args += ["loglevel=7"] if s.debug else ["quiet", "loglevel=0"]
    khz = _host_tsc_khz()
    if s.accel == "tcg" and khz:
        # Under TCG the early TSC calibration against the PIT fails now and then, and microvm
        # has no other timer to fall back on; the guest's TSC runs at the host's rate.
        args += ["tsc=reliable", f"tsc_early_khz={khz}"]
    return " ".join([*args, s.append]).strip()


def _host_tsc_khz() -> int | None:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.partition(":")[2]) * 1000)
    return None


# ---------------------------------------------------------------------------------- supervising


def run_vm(s: Settings, argv: Sequence[str], ctl: Path) -> int:
    deadline = time.monotonic() + s.timeout
    for attempt in range(1, s.boot_retries + 2):
        outcome = boot_once(argv, ctl, deadline, s.boot_timeout)
        if outcome == "stalled":
            log(f"the guest did not boot within {s.boot_timeout:g} s (attempt {attempt})")
            continue
        if outcome == "timeout" and not (ctl / "rc").exists():
            log(f"timed out after {s.timeout:g} s")
            return EXIT_TIMEOUT
        return exit_code(ctl)
    log(f"giving up after {s.boot_retries + 1} boots")
    return EXIT_NO_RESULT


def boot_once(argv: Sequence[str], ctl: Path, deadline: float, boot_timeout: float) -> Outcome:
    for name in ("booted", "rc", "rc.part"):
        (ctl / name).unlink(missing_ok=True)
    # Its own process group: a Ctrl-C reaches only us, and we end QEMU (quietly).
    with subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, process_group=0
    ) as qemu:
        try:
            return supervise(qemu, ctl, deadline, boot_timeout)
        finally:
            qemu.kill()  # a no-op once it has exited; leaving the block reaps it


def supervise(
    qemu: subprocess.Popen[bytes], ctl: Path, deadline: float, boot_timeout: float
) -> Outcome:
    """Relay the serial console to our stdout until QEMU exits, watching three clocks: the
    boot watchdog, the overall deadline, and the power-off after the command's exit code."""
    out = qemu.stdout
    assert out is not None  # Popen(stdout=PIPE)
    started = time.monotonic()
    rc_seen: float | None = None
    os.set_blocking(out.fileno(), False)
    with selectors.DefaultSelector() as selector:
        selector.register(out, selectors.EVENT_READ)
        while relay(out):
            selector.select(timeout=0.1)
            now = time.monotonic()
            if now >= deadline:
                return "timeout"
            if rc_seen is None and (ctl / "rc").exists():
                rc_seen = now
            if rc_seen is not None and now - rc_seen > POWEROFF_GRACE:
                log("the VM did not power off; killing it")
                return "exited"
            if not (ctl / "booted").exists() and now - started > boot_timeout:
                return "stalled"
    qemu.wait()
    return "exited"


def relay(out: IO[bytes]) -> bool:
    """Copy what QEMU has written so far to our stdout; False at end of file (QEMU exited)."""
    while True:
        try:
            chunk = os.read(out.fileno(), 65536)
        except BlockingIOError:
            return True
        if not chunk:
            return False
        try:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            pass  # our reader went away; the exit code still matters


def exit_code(ctl: Path) -> int:
    try:
        return int((ctl / "rc").read_text())
    except (FileNotFoundError, ValueError):
        log("the VM ended without a result; PLEXUS_VM_DEBUG=1 shows the kernel's messages")
        return EXIT_NO_RESULT


# ----------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.vm.runner",
        usage="%(prog)s [--timeout S] -- CMD [ARGS...]",
        description="Run CMD as root in a throw-away QEMU VM with Debian's stock kernel.",
        epilog="exit code: CMD's own; 124 on timeout; 125 when the VM gave no result",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help=f"seconds for the run (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("command", nargs="+", metavar="CMD", help="the command, after --")
    return parser.parse_args(argv)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that kill QEMU


def run(command: Sequence[str], timeout: float | None) -> int:
    if os.geteuid() != 0:
        raise VmError("must run as root (QEMU shares / with security_model=none)")
    cwd = Path.cwd().resolve()
    if cwd == Path("/"):
        raise VmError("run it from a project directory, not /")
    s = Settings.load(os.environ, timeout)
    with cache_lock(s.cache):  # also what keeps two runs from building netdevsim at once
        wanted, missing = loadable_modules(s, module_dir(s))
        kernel, initrd = boot_image(s), initramfs(s, wanted)
    with control_dir(s, command, cwd, missing) as ctl:
        return run_vm(s, qemu_argv(s, kernel, initrd, ctl, cwd), ctl)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    try:
        return run(args.command, args.timeout)
    except VmError as exc:
        log(str(exc))
        return EXIT_NO_RESULT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
