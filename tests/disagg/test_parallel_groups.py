"""A worker the operator placed in a group spanning pods stops at once with an error naming the setting (not
built yet) instead of serving as a whole model; the operator's tensor- and pipeline-parallel sizes within a pod
become the worker's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("env, named", [({"TANDEM_GROUP_SIZE": "4", "TANDEM_WORKER_INDEX": "1"}, "TANDEM_GROUP_SIZE=4"),
                                        ({"TANDEM_PIPELINE_PARALLEL_SIZE": "x"}, "not a positive integer")])
def test_group_member_fails_loudly(role, env, named):
    proc = subprocess.run([sys.executable, "-m", "tandem.cli", role, "--port", "0"], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert named in proc.stderr and "tandem " + role in proc.stderr
    assert "TANDEM_READY" not in proc.stdout


def test_tensor_parallel_settings_reach_the_engine():
    from argparse import Namespace

    from tandem.worker.process import parallelism_error

    def args():
        return Namespace(tensor_parallel_size=1, pipeline_parallel_size=1)

    plain = args()
    assert parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "1", "TANDEM_PIPELINE_PARALLEL_SIZE": "1"}, plain) is None
    assert parallelism_error({}, plain) is None and plain.tensor_parallel_size == plain.pipeline_parallel_size == 1
    both = args()
    assert parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "4", "TANDEM_PIPELINE_PARALLEL_SIZE": "2"}, both) is None
    assert (both.tensor_parallel_size, both.pipeline_parallel_size) == (4, 2)
    flagged = Namespace(tensor_parallel_size=4, pipeline_parallel_size=1)
    assert "disagree" in parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "2"}, flagged)
