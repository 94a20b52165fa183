"""The CPU kernels built for a CPU without AVX-512 (x86-64-v3: AVX2), as other machines build them with
-march=native: they compile, and attention and the elementwise kernels still match their twins. Runs in a
subprocess, since a process holds one build of the ops. The build starts over a builder killed mid-compile
(which leaves torch's `lock` file behind), as an interrupted first `make run` leaves it."""
from __future__ import annotations

import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

import pytest

BUILD = textwrap.dedent("""
    import sys
    import torch
    from tandem.kernels import cpu
    assert cpu.build(["-O3", "-march=x86-64-v3", "-fopenmp", "-ffp-contract=off"], sys.argv[1])
""")
SCRIPT = BUILD + textwrap.dedent("""
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/kernels/test_cpu_attention.py",
                          "tests/kernels/test_cpu_ops.py"]))
""")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 flags")
def test_avx2_build_matches_twins(tmp_path):
    killed = subprocess.Popen([sys.executable, "-c", BUILD, str(tmp_path)], start_new_session=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "lock").exists():
        assert killed.poll() is None and time.monotonic() < deadline, "the first builder never started compiling"
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # with its compilers, as a killed worker's process group goes
    killed.wait()
    assert (tmp_path / "lock").exists()  # what a killed builder leaves: without the fix, the next one waits forever
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout
