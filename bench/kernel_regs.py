"""Registers, spills and shared memory of the engine's GPU tile configs, compiled for sm_90 on a machine
with no GPU (tandem/kernels/sm90.py: Triton's compiler and its own ptxas; the GPU image's Triton may
allocate a little differently). For kernel work before GPU time is spent: a config that spills, or needs
two thread blocks' worth of registers, shows here.

    python bench/kernel_regs.py
"""
from __future__ import annotations

import os
import subprocess
import sys

if os.environ.pop("TRITON_INTERPRET", None) is not None:  # the interpreter replaces the compiler
    sys.exit(subprocess.call([sys.executable, *sys.argv]))

import torch  # noqa: E402

from tandem.kernels.paged_decode_attention import decode_config  # noqa: E402
from tandem.kernels.paged_prefill_attention import prefill_config  # noqa: E402
from tandem.kernels.sm90 import compile_sm90, resources  # noqa: E402

CUDA = torch.device("cuda")  # only its type is read: configs as a GPU would get them


def launches() -> list[tuple[str, str, str, dict, dict]]:
    """(label, module, kernel, constexprs, launch options) for the 8B geometry (Hq 32, Hkv 8, D 128)."""
    out = []
    prefill = dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=128, SLOT_SIZE=1024, BLOCK_D=128, BLOCK_SIZE=16, HAS_WINDOW=False,
                   PRECISION="tf32", SEQS_PAD=16)
    for label, length, packed in (("prefill, chunks <= 1,024", 512, False), ("prefill, longer chunks", 4096, False),
                                  ("prefill, prompt lanes", 64, True)):
        cfg = prefill_config(128, 4, torch.bfloat16, CUDA, length, packed)
        out.append((label, "tandem.kernels.paged_prefill_attention", "_prefill_kernel",
                    dict(prefill, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], NUM_SPLITS=1, PACKED=packed),
                    dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    decode = dict(NUM_HEADS=32, GROUP=4, HEAD_DIM=128, BLOCK_D=128, SLOT_SIZE=1024, ROWS=16, BLOCK_SIZE=16,
                  HAS_WINDOW=False, PRECISION="tf32", PDL=False)
    for label, per_sm, splits in (("decode, few programs an SM", 2, 1), ("decode, 4 an SM", 4, 1),
                                  ("decode, 16 an SM", 16, 1), ("decode, 8 splits", 16, 8)):
        cfg = decode_config(128, CUDA, per_sm, splits)
        out.append((label, "tandem.kernels.paged_decode_attention", "_decode_kernel",
                    dict(decode, BLOCK_N=cfg["block_n"], NUM_SPLITS=splits, SKIP_EMPTY=splits > 1,
                         MIN_SPLIT_TILES=256 // cfg["block_n"] if splits > 1 else 1),
                    dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])))
    for bans in (False, True):
        out.append((f"greedy tail, bans {bans}", "tandem.kernels.greedy", "_chunk_kernel",
                    dict(NUM_CHUNKS=63, CHUNK=2048, HAS_BANS=bans, PDL=False), dict(num_warps=4)))
    return out


def main() -> None:
    print(f"{'config':28} {'warps':>5} {'regs':>5} {'spilled B':>9} {'shared KiB':>10}  constexprs")
    for label, module, kernel, constants, options in launches():
        r = resources(compile_sm90(module, kernel, constants, options))
        tiles = {k: v for k, v in constants.items() if k.startswith("BLOCK_") or k == "NUM_SPLITS"}
        regs, spilled = ("?" if r[k] is None else r[k] for k in ("registers", "spill_bytes"))
        print(f"{label:28} {options['num_warps']:5} {regs:>5} {spilled:>9} {r['shared'] / 1024:10.1f}  {tiles} "
              f"stages {options.get('num_stages', '-')}", flush=True)


if __name__ == "__main__":
    main()
