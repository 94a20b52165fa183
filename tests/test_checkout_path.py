"""A source checkout on sys.path must not shadow other packages with its top-level kernels/ and
operator/ folders (tandem/__init__.py moves it last): `python -c` / `python -m` run from the checkout
put it first."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import importlib.metadata, importlib.util, json, sys
import tandem
spec = importlib.util.find_spec("kernels")
try:
    hf_kernels = bool(importlib.metadata.distribution("kernels").files)  # transformers >= 5.25 brings it
except importlib.metadata.PackageNotFoundError:
    hf_kernels = False
print(json.dumps({"last": sys.path[-1], "first": sys.path[0], "kernels": spec.origin if spec else None,
                  "hf_kernels": hf_kernels, "operator": sys.modules["operator"].__file__}))
"""


def test_checkout_goes_last_on_the_path():
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}  # as a user runs it
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert os.path.abspath(seen["last"]) == str(ROOT) and os.path.abspath(seen["first"] or ".") != str(ROOT)
    if seen["hf_kernels"]:  # else ours is the only `kernels` there is: nothing to shadow
        assert not seen["kernels"].startswith(str(ROOT / "kernels"))
    assert not seen["operator"].startswith(str(ROOT))
