"""Small C kernels compiled for this machine at first use and loaded with ctypes (no PyTorch headers, no build
step at install): ``load_kernel(source, name)``.

The shared library is compiled with the system C compiler (``$CC``, else ``cc``) at ``-O3 -march=native
-ffast-math`` (:data:`FLAGS`) into ``$TOKSCALE_NATIVE_DIR`` (default ``~/.cache/tokscale/native``), under a name that hashes the
source, the flags, the compiler's version and this CPU's model and flags, so that a home directory shared by
different nodes of a cluster never loads a library built for another CPU. Compiling takes about a second, once.

Every caller keeps a PyTorch path: the kernel is ``None`` (and the reason logged once) when there is no compiler,
the compilation fails, ``TOKSCALE_NATIVE=0`` asks for the PyTorch path, or ``ATEN_CPU_CAPABILITY=default`` asks
PyTorch for CPU-independent kernels (a machine-specific library would not honour it: the pinned fixed-seed runs of
the tests use that setting).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

NATIVE_ENV = "TOKSCALE_NATIVE"
NATIVE_DIR_ENV = "TOKSCALE_NATIVE_DIR"
# -fopenmp-simd: the kernels' `#pragma omp simd` loops vectorise without OpenMP's runtime. On x86, 512-bit vectors
# where the CPU has them (gcc otherwise keeps to 256 bits).
FLAGS = (
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fopenmp-simd",
    "-fPIC",
    "-shared",
    *(("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ()),
)


def native_dir() -> Path:
    return Path(os.environ.get(NATIVE_DIR_ENV) or Path.home() / ".cache" / "tokscale" / "native")


def disabled_reason() -> str | None:
    """Why kernels are off by the environment, or None."""
    if os.environ.get(NATIVE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{NATIVE_ENV}={os.environ[NATIVE_ENV]}"
    if os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower() == "default":
        return "ATEN_CPU_CAPABILITY=default asks for CPU-independent kernels"
    return None


def _cpu_signature() -> str:
    """The CPU's model name and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def load_kernel(
    source: str | Path, name: str, defines: tuple[tuple[str, int], ...] = ()
) -> ctypes.CDLL | None:
    """The C file ``source`` compiled for this machine (with ``-DKEY=VALUE`` for each of ``defines``) and loaded,
    or None (the reason logged once). The environment is read at every call, so that ``TOKSCALE_NATIVE=0`` takes
    effect in a running process."""
    reason = disabled_reason()
    if reason is not None:
        _log_once(f"native kernel {name} not used: {reason}")
        return None
    flags = tuple(f"-D{key}={value}" for key, value in defines)
    return _build_and_load(str(source), name, flags, Path(source).stat().st_mtime_ns)


@functools.cache
def _log_once(message: str) -> None:
    log.info(message)


@functools.cache
def _build_and_load(source: str, name: str, flags: tuple[str, ...], _mtime: int) -> ctypes.CDLL | None:
    """(Cached per process, and per modification time of the source.)"""
    cc = _compiler()
    if cc is None:
        log.warning(
            "native kernel %s not used: no C compiler (cc, or $CC) on PATH; the PyTorch path runs", name
        )
        return None
    flags = (*FLAGS, *flags)
    try:
        text = Path(source).read_bytes()
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256(
            b"\0".join([text, " ".join(flags).encode(), version.encode(), _cpu_signature().encode()])
        )
        lib = native_dir() / f"{name}-{key.hexdigest()[:16]}.so"
        if not lib.exists():
            _compile(cc, flags, source, lib)
        return ctypes.CDLL(str(lib))
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("native kernel %s not used (%s); the PyTorch path runs", name, exc)
        return None


def _compile(cc: str, flags: tuple[str, ...], source: str, lib: Path) -> None:
    """Compile into a temporary file beside ``lib``, then rename it: atomic, so that concurrent ranks compiling
    the same kernel never load half a library."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, source, "-lm"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed to compile {source} (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
