"""What every child object shares: names, labels, the owner reference, and the pieces of a pod
(environment, probes, placement, security). Pure functions of the TandemModel."""
from __future__ import annotations

import hashlib
import json
from typing import Any

from tandem.operator.spec import GROUP, KIND, VERSION, Placement, TandemModel

ROUTER_HTTP, ROUTER_GRPC, WORKER_GRPC, WORKER_HTTP, KVSTORE_GRPC = 8000, 50051, 50052, 8080, 50060
DECODE_KV = 50053  # decode's KV receiver: prefill pods stream blocks here, to the endpoint in the ticket
MODEL_DIR = "/models"
MANAGED_BY = "tandem-operator"
MODEL_LABEL = "tandem.dev/model"
COMPONENT_LABEL = "app.kubernetes.io/component"
HASH_ANNOTATION = "tandem.dev/spec-hash"
GROUP_INDEX_LABEL = "tandem.dev/group-index"
Obj = dict[str, Any]


def child_name(model: TandemModel, *parts: str | int) -> str:
    return "-".join([model.owner.name, *map(str, parts)])


def service_host(model: TandemModel, service: str) -> str:
    """The cluster DNS name of one of the model's Services."""
    return f"{service}.{model.owner.namespace}.svc.cluster.local"


def gateway_url(model: TandemModel) -> str:
    return f"http://{child_name(model, 'router')}.{model.owner.namespace}.svc:{ROUTER_HTTP}"


def router_grpc_address(model: TandemModel) -> str:
    return f"{child_name(model, 'router')}.{model.owner.namespace}.svc:{ROUTER_GRPC}"


def selector_labels(model: TandemModel, component: str) -> dict[str, str]:
    return {MODEL_LABEL: model.owner.name, COMPONENT_LABEL: component}


def labels(model: TandemModel, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tandem", "app.kubernetes.io/managed-by": MANAGED_BY,
            **selector_labels(model, component)}


def owner_reference(model: TandemModel) -> Obj:
    # garbage collection deletes every child with the TandemModel (no finalizer needed)
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": model.owner.name, "uid": model.owner.uid,
            "controller": True, "blockOwnerDeletion": True}


def metadata(model: TandemModel, name: str, component: str, extra_labels: dict[str, str] | None = None) -> Obj:
    return {"name": name, "namespace": model.owner.namespace,
            "labels": {**labels(model, component), **(extra_labels or {})},
            "ownerReferences": [owner_reference(model)]}


def content_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """The object with the hash of its content as an annotation: equal hashes mean nothing to patch."""
    meta = obj["metadata"]
    return {**obj, "metadata": {**meta, "annotations": {**meta.get("annotations", {}),
                                                         HASH_ANNOTATION: content_hash(obj)}}}


def model_argument(model: TandemModel) -> list[str]:
    """The MODEL positional argument of every service: a folder on the claim, an HF id, or none."""
    source = model.spec.model.source
    if source is None:
        return []
    if source.hf is not None:
        return [source.hf]
    return [f"{MODEL_DIR}/{source.pvc.path.strip('/')}".rstrip("/")]


def model_volumes(model: TandemModel) -> tuple[list[Obj], list[Obj]]:
    """(volumes, volumeMounts) that put the model's claim at MODEL_DIR, read-only."""
    source = model.spec.model.source
    if source is None or source.pvc is None:
        return [], []
    claim = {"claimName": source.pvc.claim_name, "readOnly": True}
    return [{"name": "model", "persistentVolumeClaim": claim}], [{"name": "model", "mountPath": MODEL_DIR,
                                                                  "readOnly": True}]


def field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def base_env(model: TandemModel) -> list[Obj]:
    env = [field_env("POD_NAME", "metadata.name"), field_env("POD_NAMESPACE", "metadata.namespace"),
           field_env("POD_IP", "status.podIP"), {"name": "TANDEM_NO_PROGRESS", "value": "1"}]
    if model.spec.kv_store.enabled:
        address = f"{service_host(model, child_name(model, 'kvstore'))}:{KVSTORE_GRPC}"
        env.append({"name": "TANDEM_KVSTORE_ADDRESS", "value": address})
    return env


def http_probes(port: str, startup_seconds: int, live_path: str = "/health") -> Obj:
    """Readiness on the service's /health; startup and liveness on `live_path` (a long startup window while
    weights load, then tighter checks). A router's /health says whether any decode worker is live, which is
    no reason to restart it: its liveness asks only that the process answers."""
    ready, live = {"path": "/health", "port": port}, {"path": live_path, "port": port}
    return {"startupProbe": {"httpGet": live, "periodSeconds": 10, "timeoutSeconds": 5,
                             "failureThreshold": max(1, startup_seconds // 10)},
            "readinessProbe": {"httpGet": ready, "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
            "livenessProbe": {"httpGet": live, "periodSeconds": 15, "timeoutSeconds": 5, "failureThreshold": 4}}


def resources(placement: Placement, gpus: int = 0) -> Obj:
    out: Obj = {}
    for kind in ("limits", "requests"):
        values = dict(getattr(placement.resources, kind))
        if gpus:  # an extended resource: requests must equal limits
            values["nvidia.com/gpu"] = gpus
        if values:
            out[kind] = values
    return out


CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def container(model: TandemModel, name: str, args: list[str], ports: list[Obj], env: list[Obj], res: Obj,
              probes: Obj, mounts: list[Obj]) -> Obj:
    out: Obj = {"name": name, "image": model.image, "args": args, "ports": ports, "env": env,
                "resources": res, **probes, "securityContext": CONTAINER_SECURITY}
    if model.spec.image_pull_policy:
        out["imagePullPolicy"] = model.spec.image_pull_policy
    if mounts:
        out["volumeMounts"] = mounts
    return out


def pod_spec(placement: Placement, main: Obj, volumes: list[Obj], grace_seconds: int) -> Obj:
    spec: Obj = {"containers": [main], "enableServiceLinks": False, "automountServiceAccountToken": False,
                 "terminationGracePeriodSeconds": grace_seconds,
                 "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}}
    if volumes:
        spec["volumes"] = volumes
    if placement.node_selector:
        spec["nodeSelector"] = dict(placement.node_selector)
    if placement.tolerations:
        spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in placement.tolerations]
    return spec


def port(name: str, number: int) -> Obj:
    return {"name": name, "containerPort": number, "protocol": "TCP"}


def service_port(name: str, number: int) -> Obj:
    return {"name": name, "port": number, "targetPort": name, "protocol": "TCP"}
