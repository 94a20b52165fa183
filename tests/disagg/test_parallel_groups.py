"""A worker the operator placed in a tensor/pipeline-parallel group stops at once with an error
naming the setting (the engine runs one GPU per replica so far) instead of serving as a whole model."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("env, named", [({"TANDEM_TENSOR_PARALLEL_SIZE": "2"}, "TANDEM_TENSOR_PARALLEL_SIZE=2"),
                                        ({"TANDEM_GROUP_SIZE": "4", "TANDEM_WORKER_INDEX": "1"}, "TANDEM_GROUP_SIZE=4"),
                                        ({"TANDEM_PIPELINE_PARALLEL_SIZE": "x"}, "not a positive integer")])
def test_group_member_fails_loudly(role, env, named):
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", role, "--port", "0"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert named in proc.stderr and "tandem " + role in proc.stderr
    assert "TANDEM_READY" not in proc.stdout


def test_single_gpu_replica_settings_pass():
    from tandem.worker.process import parallelism_error

    assert parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "1", "TANDEM_PIPELINE_PARALLEL_SIZE": "1"}) is None
    assert parallelism_error({}) is None
