"""The prefill and decode pools. A replica that fits in one pod is a pod of a Deployment; one whose
tensor x pipeline parallelism spans pods is a group: a leader (worker index 0) and its workers, as a
real LeaderWorkerSet where that CRD is installed, else as one StatefulSet per group. Either way the
router finds the serving pods (the leaders) through the pool's headless Service `<model>-<pool>`."""
from __future__ import annotations

from typing import Literal

from tandem.operator.common import (DECODE_KV, GROUP_INDEX_LABEL, MODEL_DIR, WORKER_GRPC, WORKER_HTTP, Obj, base_env, child_name,
                                    container, http_probes, labels, metadata, model_argument, model_volumes,
                                    pod_spec, port, resources, router_grpc_address, selector_labels,
                                    service_host, service_port)
from tandem.operator import group_key
from tandem.operator.spec import PoolSpec, TandemModel

Pool = Literal["prefill", "decode"]
LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"
LWS_LABELS = "leaderworkerset.sigs.k8s.io"
POD_INDEX_LABEL = "apps.kubernetes.io/pod-index"  # set on StatefulSet pods since Kubernetes 1.28


def worker_args(model: TandemModel, pool: Pool) -> list[str]:
    spec = model.spec
    args = [pool, *model_argument(model), "--port", str(WORKER_GRPC), "--http-port", str(WORKER_HTTP),
            "--dtype", spec.model.dtype]
    if spec.model.max_model_len is not None:
        args += ["--max-model-len", str(spec.model.max_model_len)]
    if pool == "decode":
        args += ["--kv-port", str(DECODE_KV)]
    if spec.model.lora_adapters:
        args += ["--lora-modules", *(f"{a.name}={MODEL_DIR}/{a.path.strip('/')}" for a in spec.model.lora_adapters)]
    return [*args, "--router", router_grpc_address(model), *getattr(spec, pool).extra_args]


def pod_template(model: TandemModel, pool: Pool, group_env: list[Obj], extra_labels: dict[str, str]) -> Obj:
    spec: PoolSpec = getattr(model.spec, pool)
    env = [*base_env(model), {"name": "TANDEM_TENSOR_PARALLEL_SIZE", "value": str(spec.tensor_parallel_size)},
           {"name": "TANDEM_PIPELINE_PARALLEL_SIZE", "value": str(spec.pipeline_parallel_size)}, *group_env]
    volumes, mounts = model_volumes(model)
    if spec.gpus_per_pod:  # NCCL and torch's workers share memory through /dev/shm
        volumes = [*volumes, {"name": "shm", "emptyDir": {"medium": "Memory"}}]
        mounts = [*mounts, {"name": "shm", "mountPath": "/dev/shm"}]
    ports = [port("grpc", WORKER_GRPC), port("metrics", WORKER_HTTP)]
    if pool == "decode":
        ports.append(port("kv", DECODE_KV))
    main = container(model, pool, worker_args(model, pool), ports,
                     env, resources(spec, spec.gpus_per_pod), http_probes("metrics", startup_seconds=3600), mounts)
    # draining: a worker deregisters and finishes its requests on SIGTERM
    return {"metadata": {"labels": {**labels(model, pool), **extra_labels}},
            "spec": pod_spec(spec, main, volumes, grace_seconds=60)}


def serving_service(model: TandemModel, pool: Pool, leader_label: dict[str, str]) -> Obj:
    """The headless Service the router polls: one address per serving pod (a group's leader)."""
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(model, child_name(model, pool), pool),
            "spec": {"clusterIP": "None", "selector": {**selector_labels(model, pool), **leader_label},
                     "ports": [service_port("grpc", WORKER_GRPC), service_port("metrics", WORKER_HTTP)]}}


def deployment(model: TandemModel, pool: Pool) -> Obj:
    spec: PoolSpec = getattr(model.spec, pool)
    body: Obj = {"replicas": model.spec.replicas(pool), "selector": {"matchLabels": selector_labels(model, pool)},
                 "template": pod_template(model, pool, [], {})}
    if spec.gpus_per_pod:  # no spare GPUs to surge onto: replace one pod at a time
        body["strategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": metadata(model, child_name(model, pool), pool),
            "spec": body}


def group_env(model: TandemModel, size: int, group_index: Obj, worker_index: Obj, leader_address: str) -> list[Obj]:
    """What a member of a group knows: its group, its index in it (0 is the leader), the leader, and the
    key that members prove they know (group_key.py)."""
    return [{"name": "TANDEM_GROUP_SIZE", "value": str(size)}, {"name": "TANDEM_GROUP_INDEX", **group_index},
            {"name": "TANDEM_WORKER_INDEX", **worker_index}, {"name": "TANDEM_LEADER_ADDRESS", "value": leader_address},
            group_key.env(model)]


def label_ref(label: str) -> Obj:
    return {"valueFrom": {"fieldRef": {"fieldPath": f"metadata.labels['{label}']"}}}


def stateful_groups(model: TandemModel, pool: Pool) -> list[Obj]:
    """One StatefulSet per group, its pod 0 the leader, all of them behind one headless Service that
    gives every member a stable DNS name (published before readiness: members find each other first)."""
    size = getattr(model.spec, pool).pods_per_replica
    group_service = child_name(model, pool, "group")
    objects: list[Obj] = [{
        "apiVersion": "v1", "kind": "Service", "metadata": metadata(model, group_service, f"{pool}-group"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector_labels(model, pool),
                 "ports": [service_port("grpc", WORKER_GRPC)]}}]
    for index in range(model.spec.replicas(pool)):
        name = child_name(model, pool, index)
        group_label = {GROUP_INDEX_LABEL: str(index)}
        env = group_env(model, size, {"value": str(index)}, label_ref(POD_INDEX_LABEL),
                        f"{name}-0.{service_host(model, group_service)}")
        objects.append({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": metadata(model, name, pool, group_label),
            "spec": {"replicas": size, "serviceName": group_service, "podManagementPolicy": "Parallel",
                     # a group changes as a whole: the operator rebuilds it (see reconcile.py)
                     "updateStrategy": {"type": "OnDelete"},
                     "selector": {"matchLabels": {**selector_labels(model, pool), **group_label}},
                     "template": pod_template(model, pool, env, group_label)}})
    return [*objects, serving_service(model, pool, {POD_INDEX_LABEL: "0"})]


def leader_worker_set(model: TandemModel, pool: Pool) -> list[Obj]:
    """A real LeaderWorkerSet: it makes the groups, their headless Service (named after it) and restarts a
    group as a whole when one of its pods restarts."""
    size = getattr(model.spec, pool).pods_per_replica
    name = child_name(model, pool, "group")
    env = group_env(model, size, label_ref(f"{LWS_LABELS}/group-index"), label_ref(f"{LWS_LABELS}/worker-index"),
                    f"{name}-$(TANDEM_GROUP_INDEX).{service_host(model, name)}")
    lws = {"apiVersion": LWS_API_VERSION, "kind": "LeaderWorkerSet", "metadata": metadata(model, name, pool),
           "spec": {"replicas": model.spec.replicas(pool), "startupPolicy": "LeaderCreated",
                    "rolloutStrategy": {"type": "RollingUpdate",
                                        "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
                    "leaderWorkerTemplate": {"size": size, "restartPolicy": "RecreateGroupOnPodRestart",
                                             "workerTemplate": pod_template(model, pool, env, {})}}}
    return [lws, serving_service(model, pool, {f"{LWS_LABELS}/worker-index": "0"})]


def build(model: TandemModel, pool: Pool, lws: bool) -> list[Obj]:
    if getattr(model.spec, pool).pods_per_replica == 1:
        return [deployment(model, pool), serving_service(model, pool, {})]
    return leader_worker_set(model, pool) if lws else stateful_groups(model, pool)
