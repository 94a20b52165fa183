"""A worker the operator placed in a pipeline-parallel group, or in a group spanning pods, stops at once with an
error naming the setting (neither is built yet) instead of serving as a whole model; the operator's tensor-parallel
size within a pod becomes the worker's."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("role", ["prefill", "decode"])
@pytest.mark.parametrize("env, named", [({"TANDEM_PIPELINE_PARALLEL_SIZE": "2"}, "TANDEM_PIPELINE_PARALLEL_SIZE=2"),
                                        ({"TANDEM_GROUP_SIZE": "4", "TANDEM_WORKER_INDEX": "1"}, "TANDEM_GROUP_SIZE=4"),
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

    args = Namespace(tensor_parallel_size=1)
    assert parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "1", "TANDEM_PIPELINE_PARALLEL_SIZE": "1"}, args) is None
    assert parallelism_error({}, args) is None and args.tensor_parallel_size == 1
    assert parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "4"}, args) is None and args.tensor_parallel_size == 4
    assert "disagree" in parallelism_error({"TANDEM_TENSOR_PARALLEL_SIZE": "2"}, Namespace(tensor_parallel_size=4))
