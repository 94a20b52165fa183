"""The optional KV store: a Deployment and a headless Service (one address per replica). Its service
(`tandem kvstore`) has no HTTP side yet, so its probes check that the gRPC port accepts connections."""
from __future__ import annotations

from tandem.operator.common import (KVSTORE_GRPC, Obj, base_env, child_name, container, metadata, pod_spec, port,
                                    resources, selector_labels, service_port)
from tandem.operator.spec import TandemModel


def build(model: TandemModel) -> list[Obj]:
    spec = model.spec.kv_store
    if not spec.enabled:
        return []
    name = child_name(model, "kvstore")
    tcp = {"tcpSocket": {"port": "grpc"}}
    probes = {"readinessProbe": {**tcp, "periodSeconds": 5}, "livenessProbe": {**tcp, "periodSeconds": 15}}
    env = [*base_env(model), {"name": "TANDEM_KVSTORE_CAPACITY", "value": str(spec.capacity)}]
    main = container(model, "kvstore", ["kvstore", "--port", str(KVSTORE_GRPC)], [port("grpc", KVSTORE_GRPC)], env,
                     resources(spec), probes, [])
    meta = metadata(model, name, "kvstore")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                  "spec": {"replicas": spec.replicas, "selector": {"matchLabels": selector_labels(model, "kvstore")},
                           "template": {"metadata": {"labels": meta["labels"]},
                                        "spec": pod_spec(spec, main, [], grace_seconds=30)}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": metadata(model, name, "kvstore"),
               "spec": {"clusterIP": "None", "selector": selector_labels(model, "kvstore"),
                        "ports": [service_port("grpc", KVSTORE_GRPC)]}}
    return [deployment, service]
