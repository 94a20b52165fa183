"""The CPU kernels built for a CPU without AVX-512 (x86-64-v3: AVX2), as other machines build them with
-march=native: they compile, and attention and the elementwise kernels still match their twins. Runs in a
subprocess, since a process holds one build of the ops."""
from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from tandem.kernels import cpu
    assert cpu.build(["-O3", "-march=x86-64-v3", "-fopenmp", "-ffp-contract=off"], sys.argv[1])
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/kernels/test_cpu_attention.py",
                          "tests/kernels/test_cpu_ops.py"]))
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 flags")
def test_avx2_build_matches_twins(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
