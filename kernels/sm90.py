"""Compiling a kernel for an H100/H200 (sm_90) on a machine with no GPU, the way a launch would (pointers
and strides 16-aligned): the tests check that the GPU tile configs compile and fit in shared memory, and
`bench/kernel_regs.py` reports their registers and spills before GPU time goes to a config. Triton's
interpreter replaces its compiler: run this in a process without TRITON_INTERPRET."""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import tempfile

UNALIGNED = ("window", "scale_log2")  # arguments a launch passes with no 16-divisibility


def arg_type(name: str) -> str:
    """A kernel argument's Triton type, from the names the kernels share (q_ptr, tables_ptr, part_acc_ptr...)."""
    if name.endswith("_ptr"):
        if name.startswith("ban"):
            return "*i64"
        if name.startswith("part"):
            return "*fp32"
        return "*i32" if name[:2] in ("ta", "le", "cu", "ro") else "*bf16"
    return "fp32" if name.startswith("scale") else "i64" if name == "v_plane" else "i32"


def compile_sm90(module: str, kernel: str, constants: dict, options: dict):
    """The kernel `module.kernel` compiled with these constexprs and launch options (num_warps, ...)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    signature = {n: "constexpr" if n in constants else arg_type(n) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
             if n not in constants and n not in UNALIGNED}
    source = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constants.items()}, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def _ptxas_paths() -> list[str]:
    """Triton's ptxas for sm_90 (what compiled the kernel), then the copies in its wheel, newest first."""
    import triton

    paths = []
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        paths.append(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 -- other Triton versions spell it otherwise: the wheel's copies below
        pass
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return paths + [os.path.join(tools, name) for name in ("ptxas-blackwell", "ptxas")]


def resources(compiled) -> dict:
    """Shared memory bytes, and registers a thread and spilled bytes from `ptxas -v` on the kernel's PTX
    (None where no ptxas at hand reads this PTX version)."""
    out = {"shared": compiled.metadata.shared, "registers": None, "spill_bytes": None}
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for path in filter(os.path.exists, _ptxas_paths()):
            done = subprocess.run([path, "-v", "--gpu-name", "sm_90a", ptx, "-o", os.path.join(tmp, "k.o")],
                                  capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", done.stderr)
            if done.returncode == 0 and regs:
                spills = re.search(r"(\d+) bytes spill stores", done.stderr)
                out.update(registers=int(regs.group(1)), spill_bytes=int(spills.group(1)) if spills else 0)
                break
    return out
