"""The CRD, its examples, TandemModel specs of every shape the builders handle, and validation of what
the builders return against the Kubernetes 1.30 schemas."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tandem.operator.spec import TandemModel

ROOT = Path(__file__).resolve().parents[2]
CRD_PATH = ROOT / "deploy" / "crds" / "tandemmodel.yaml"
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
KUBE_VERSION = "1.30"

GPU_POOL = {"replicas": 2, "gpusPerPod": 8, "resources": {"requests": {"cpu": "8", "memory": "64Gi"}},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}
SPECS: dict[str, dict[str, Any]] = {
    "cpu-default": {},
    "cpu-hf-kvstore": {"model": {"source": {"hf": "HuggingFaceTB/SmolLM2-135M-Instruct"}, "maxModelLen": 2048},
                       "kvStore": {"enabled": True, "capacity": "8Gi"}, "slo": {"ttftMillis": 500},
                       "router": {"replicas": 2, "localPrefillThreshold": 64, "decodeScorers": "kv_free=1,load=2"}},
    "gpu-single-pod": {"model": {"source": {"pvc": {"claimName": "weights", "path": "llama-8b"}}, "dtype": "bfloat16",
                                 "loraAdapters": [{"name": "sql", "path": "adapters/sql"},
                                                  {"name": "chat", "path": "/adapters/chat/"}]},
                       "prefill": {**GPU_POOL, "tensorParallelSize": 4},
                       "decode": {**GPU_POOL, "tensorParallelSize": 8, "nodeSelector": {"gpu": "h100"}}},
    "gpu-groups": {"model": {"source": {"pvc": {"claimName": "weights"}}},
                   "prefill": {**GPU_POOL, "tensorParallelSize": 8, "pipelineParallelSize": 2},
                   "decode": {**GPU_POOL, "replicas": 3, "tensorParallelSize": 8, "pipelineParallelSize": 4},
                   "kvStore": {"enabled": True, "diskCapacity": "100Gi"},
                   "autoscaling": {"decode": {"minReplicas": 1, "maxReplicas": 2}}},
}


def body_of(spec: dict, name: str = "m1", namespace: str = "models", uid: str = "uid-1") -> dict:
    return {"apiVersion": "tandem.dev/v1alpha1", "kind": "TandemModel",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "generation": 1}, "spec": copy.deepcopy(spec)}


def model_of(spec: dict, **meta: str) -> TandemModel:
    return TandemModel.from_body(body_of(spec, **meta), default_image="tandem:test")


def load_crd() -> dict:
    return yaml.safe_load(CRD_PATH.read_text())


def example_bodies() -> list[dict]:
    return [obj for path in EXAMPLES for obj in yaml.safe_load_all(path.read_text()) if obj]


def validate_k8s(obj: dict) -> None:
    """Raises unless `obj` passes the Kubernetes 1.30 schema (unknown fields rejected). A LeaderWorkerSet
    is not in those schemas: its shape is checked here and its pod template as a core PodTemplate."""
    if obj["kind"] != "LeaderWorkerSet":
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
        return
    spec = obj["spec"]
    assert obj["apiVersion"] == "leaderworkerset.x-k8s.io/v1" and obj["metadata"]["name"]
    assert set(spec) <= {"replicas", "startupPolicy", "rolloutStrategy", "leaderWorkerTemplate", "networkConfig"}
    assert isinstance(spec["replicas"], int) and spec["replicas"] >= 0
    assert spec["startupPolicy"] in ("LeaderCreated", "LeaderReady")
    template = spec["leaderWorkerTemplate"]
    assert set(template) <= {"size", "restartPolicy", "leaderTemplate", "workerTemplate", "subGroupPolicy"}
    assert isinstance(template["size"], int) and template["size"] >= 1
    assert template["restartPolicy"] in ("RecreateGroupOnPodRestart", "None")
    pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": obj["metadata"]["name"]},
                    "template": template["workerTemplate"]}
    kubernetes_validate.validate(pod_template, KUBE_VERSION, strict=True)


@pytest.fixture(params=sorted(SPECS))
def spec_name(request) -> str:
    return request.param
