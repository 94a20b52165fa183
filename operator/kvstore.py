"""The optional KV store: a Deployment running `tandem kvstore` and a headless Service (one address
per replica) with its gRPC port and its metrics port. The DRAM tier's size comes from
kvStore.capacity; kvStore.diskCapacity adds a disk tier on an emptyDir (a cache: it may go with the
pod). Probes read the store's /health, like the worker pools'."""
from __future__ import annotations

from tandem.kvstore.sizes import parse_bytes
from tandem.operator.common import (KVSTORE_GRPC, WORKER_HTTP, Obj, base_env, child_name, container, http_probes,
                                    metadata, pod_spec, port, resources, selector_labels, service_port)
from tandem.operator.spec import KVStoreSpec, TandemModel

DISK_DIR = "/var/cache/tandem/kvstore"


def kvstore_args(spec: KVStoreSpec) -> list[str]:
    args = ["kvstore", "--port", str(KVSTORE_GRPC), "--http-port", str(WORKER_HTTP),
            "--capacity-bytes", str(spec.capacity)]
    if spec.disk_capacity is not None:
        args += ["--disk-dir", DISK_DIR, "--disk-capacity-bytes", str(spec.disk_capacity)]
    return args


def disk_size_limit(spec: KVStoreSpec) -> str:
    """The emptyDir's sizeLimit: the store keeps its files' bytes under diskCapacity, but the file
    system rounds each file up to whole blocks, and the kubelet evicts a pod over its limit. A 16th
    more covers that for KV blocks of 64 KiB and more; 64 MiB covers small capacities."""
    disk = parse_bytes(str(spec.disk_capacity))
    return str(disk + disk // 16 + (64 << 20))


def build(model: TandemModel) -> list[Obj]:
    spec = model.spec.kv_store
    if not spec.enabled:
        return []
    name = child_name(model, "kvstore")
    volumes, mounts = [], []
    if spec.disk_capacity is not None:
        volumes = [{"name": "kv-disk", "emptyDir": {"sizeLimit": disk_size_limit(spec)}}]
        mounts = [{"name": "kv-disk", "mountPath": DISK_DIR}]
    # the store starts in a second (adopting disk files is a directory scan): a short startup window
    main = container(model, "kvstore", kvstore_args(spec), [port("grpc", KVSTORE_GRPC), port("metrics", WORKER_HTTP)],
                     base_env(model), resources(spec), http_probes("metrics", startup_seconds=60), mounts)
    meta = metadata(model, name, "kvstore")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
                  "spec": {"replicas": spec.replicas, "selector": {"matchLabels": selector_labels(model, "kvstore")},
                           "template": {"metadata": {"labels": meta["labels"]},
                                        "spec": pod_spec(spec, main, volumes, grace_seconds=30)}}}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": metadata(model, name, "kvstore"),
               "spec": {"clusterIP": "None", "selector": selector_labels(model, "kvstore"),
                        "ports": [service_port("grpc", KVSTORE_GRPC), service_port("metrics", WORKER_HTTP)]}}
    return [deployment, service]
