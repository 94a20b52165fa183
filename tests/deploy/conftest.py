"""The chart rendered with the real Helm library, and validation of what it renders: Kubernetes objects
against the Kubernetes 1.30 schemas, TandemModels against the CRD's own schema, Prometheus operator objects
against that operator's models. Also brings the live-stack fixture of tests/disagg."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.disagg.conftest import stack_factory  # noqa: F401 - a fixture, used by test_metric_names

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "tandem"
CRD = ROOT / "deploy" / "crds" / "tandemmodel.yaml"
KUBE_VERSION = "1.30"


def render(values: dict | None = None, namespace: str = "tandem-system") -> list[dict[str, Any]]:
    """Every object the chart renders for `values` (Helm's schema check included), CRDs not counted."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values=values or {}, name="tandem", namespace=namespace, is_install=True)
    return [obj for path, text in sorted(manifests.items()) if path.endswith((".yaml", ".yml"))
            for obj in yaml.safe_load_all(text) if obj]


def strict(schema: Any) -> Any:
    """A CRD schema that rejects unknown fields, as `kubectl apply --validate=strict` does (the API server
    would prune them silently): additionalProperties false where an object lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schema(crd: dict, version: str) -> dict:
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    schema = strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    # metadata is the API server's: only the name's shape is checked here
    schema.setdefault("properties", {})["metadata"] = {"type": "object", "required": ["name"], "properties": {
        "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63}}}
    return schema


def dropped(given: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of `given` that are missing from `kept` (or changed on the way)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        return [p for k, v in given.items()
                for p in (dropped(v, kept[k], f"{path}.{k}") if k in kept else [f"{path}.{k}"])]
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        return [p for i, (g, k) in enumerate(zip(given, kept)) for p in dropped(g, k, f"{path}[{i}]")]
    return [] if given == kept else [path]


def _validate_prometheus_operator(obj: dict) -> None:
    """Through the Prometheus operator's models (generated from its CRDs): types are checked on the way in
    and unknown fields dropped, so every given field must come back out."""
    v1 = pytest.importorskip("cloudcoil.models.prometheus_operator.v1")
    kept = getattr(v1, obj["kind"]).model_validate(obj).model_dump(mode="json", by_alias=True, exclude_none=True)
    assert not dropped(obj, kept), f"{obj['kind']}: unknown fields {dropped(obj, kept)}"


def validate(obj: dict) -> None:
    """Raises if `obj` would not pass the API server's validation (schemas, not admission)."""
    group = obj["apiVersion"].rpartition("/")[0]
    if group == "monitoring.coreos.com":
        _validate_prometheus_operator(obj)
    elif group == "tandem.dev":
        crd = yaml.safe_load(CRD.read_text())
        assert obj["kind"] == crd["spec"]["names"]["kind"]
        jsonschema.validate(obj, crd_schema(crd, obj["apiVersion"].rpartition("/")[2]))
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
