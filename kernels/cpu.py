"""C++ kernels for CPUs (kernels/cpu_*.cpp): paged decode attention and the model's fused
elementwise steps, each with its torch twin (kernels/reference.py, TorchAttention). Compiled on first
use with torch's extension builder and registered as `torch.ops.tandem_cpu.*`.

The build is cached per (sources, torch and Python versions, compiler flags, CPU features) under
the loader's cache dir (~/.cache/tandem/cpu_kernels; TANDEM_CACHE moves it), so only the first
process on a machine pays the ~10 s compile. Where no compiler is found, `available()` is False, one
warning says why, and the engine keeps the torch twins. TANDEM_CPU_KERNELS=0 turns the kernels off
(to measure against the twins).
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).with_name(name) for name in ("cpu_attention.cpp", "cpu_ops.cpp")]
HEADERS = [Path(__file__).with_name("cpu_common.h")]
# -fopenmp: at::parallel_for and the simd pragmas; -ffp-contract=off: no fused multiply-adds where
# torch rounds the product (the elementwise ops equal their twins in float32)
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]

OPS = ("paged_decode_attention", "rms_norm", "silu_and_mul", "rope_and_cache")
_state: dict[str, object] = {}


def _cpu_flags() -> str:
    """The CPU's feature flags: -march=native code built on one CPU may not run on another that shares
    the cache (a home directory on NFS, an image built elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_amx() -> bool:
    """Whether the CPU has AMX tiles (Sapphire Rapids and later), which oneDNN's GEMMs and SDPA use."""
    return "amx_bf16" in _cpu_flags().split()


def _build_dir() -> Path:
    key = hashlib.sha256()
    for src in SOURCES + HEADERS:
        key.update(src.read_bytes())
    key.update(f"{torch.__version__} {sys.version} {' '.join(CFLAGS)} {_cpu_flags()}".encode())
    from tandem.engine.loader import cache_dir
    path = cache_dir() / "cpu_kernels" / key.hexdigest()[:16]
    path.mkdir(parents=True, exist_ok=True)
    return path


def _ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the pip-installed one lives beside this interpreter."""
    if shutil.which("ninja") is None:
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def build(cflags: list[str], directory: str | Path) -> bool:
    """Compiles (or loads the cached build of) the kernels with these flags and registers the ops in this
    process; tests call it with portable flags to build the paths other CPUs take."""
    from torch.utils import cpp_extension
    _ninja_on_path()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # torch's builder guards the directory with a `lock` file that a killed builder leaves behind, and every
    # later process then waits on it forever. Builders here first take a kernel lock (flock), which dies with
    # its holder, so a `lock` file found while holding it belongs to a dead builder and is removed.
    with open(directory / "build.flock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        (directory / "lock").unlink(missing_ok=True)
        cpp_extension.load(name="tandem_cpu", sources=[str(s) for s in SOURCES], extra_cflags=cflags,
                           extra_ldflags=["-fopenmp"], build_directory=str(directory), is_python_module=False,
                           verbose=False)
    _state["ok"] = ok = all(hasattr(torch.ops.tandem_cpu, op) for op in OPS)
    return ok


def available() -> bool:
    """True once the ops are registered; builds them on the first call (thread-unsafe: call at start-up)."""
    if "ok" in _state:
        return bool(_state["ok"])
    ok = False
    if os.environ.get("TANDEM_CPU_KERNELS", "1") == "0":
        log.info("TANDEM_CPU_KERNELS=0: the CPU path runs the kernels' torch twins")
    else:
        try:
            ok = build(CFLAGS, _build_dir())
        except Exception as exc:  # no compiler, no ninja, or a failed build: keep the reference path
            errors = [ln for ln in str(exc).splitlines() if "error" in ln] or str(exc).splitlines()[-1:]
            log.warning("CPU kernels unavailable (%s: %s); using the torch reference path",
                        type(exc).__name__, "; ".join(errors[:3]))
    _state["ok"] = ok
    return ok


def paged_decode_attention(out: torch.Tensor, q: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """out[r] = attention of q[r] ([heads, dim]) over the first context_lens[r] tokens of row r's blocks."""
    torch.ops.tandem_cpu.paged_decode_attention(out, q, cache, block_tables, context_lens, scale,
                                                sliding_window or 0)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * weight, x + residual) over [rows, size]; with no residual, (norm(x), x)."""
    out = torch.empty(x.shape, dtype=x.dtype)
    total = torch.empty_like(out) if residual is not None else out
    torch.ops.tandem_cpu.rms_norm(out, total, x, residual, weight, eps)
    return out, (total if residual is not None else x)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[:, :n]) * x[:, n:] for x [rows, 2n]."""
    out = torch.empty(x.shape[0], x.shape[1] // 2, dtype=x.dtype)
    torch.ops.tandem_cpu.silu_and_mul(out, x)
    return out


def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """Rotated q (a new contiguous tensor); k rotated and v written into the cache at slot_mapping."""
    q_out = torch.empty(q.shape, dtype=q.dtype)
    torch.ops.tandem_cpu.rope_and_cache(q_out, q, k, v, positions, cos, sin, kv_cache, slot_mapping)
    return q_out
