"""A TandemModel's status from its children's: ready replicas per pool (groups count when ready as a
whole), conditions (Ready, <Pool>Ready, Progressing, Degraded), the gateway URL. Pure."""
from __future__ import annotations

from tandem.operator.common import GROUP_INDEX_LABEL, Obj, child_name, gateway_url
from tandem.operator.spec import TandemModel

POOL_CONDITIONS = {"router": "RouterReady", "prefill": "PrefillReady", "decode": "DecodeReady",
                   "kvStore": "KVStoreReady"}


def _ready(obj: Obj | None) -> int:
    return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)


def pool_counts(model: TandemModel, children: list[Obj]) -> dict[str, dict[str, int]]:
    """{pool: {replicas, readyReplicas}} for each pool the spec has."""
    by_key = {(obj["kind"], obj["metadata"]["name"]): obj for obj in children}
    spec = model.spec
    counts = {"router": {"replicas": spec.replicas("router"),
                         "readyReplicas": _ready(by_key.get(("Deployment", child_name(model, "router"))))}}
    for pool in ("prefill", "decode"):
        replicas = spec.replicas(pool)
        if getattr(spec, pool).pods_per_replica == 1:
            ready = _ready(by_key.get(("Deployment", child_name(model, pool))))
        elif lws := by_key.get(("LeaderWorkerSet", child_name(model, pool, "group"))):
            ready = _ready(lws)  # a LeaderWorkerSet counts the groups that are ready as a whole
        else:
            groups = [obj for obj in children if obj["kind"] == "StatefulSet"
                      and obj["metadata"]["labels"].get("app.kubernetes.io/component") == pool
                      and GROUP_INDEX_LABEL in obj["metadata"]["labels"]]
            ready = sum(1 for group in groups if _ready(group) >= group["spec"]["replicas"])
        counts[pool] = {"replicas": replicas, "readyReplicas": min(ready, replicas)}
    if spec.kv_store.enabled:
        counts["kvStore"] = {"replicas": spec.kv_store.replicas,
                             "readyReplicas": _ready(by_key.get(("Deployment", child_name(model, "kvstore"))))}
    return counts


def condition(kind: str, ok: bool, reason: str, message: str, generation: int, previous: list[Obj],
              now: str) -> Obj:
    """A condition whose lastTransitionTime moves only when its status does."""
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == kind), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since,
            "observedGeneration": generation}


def compute(model: TandemModel, children: list[Obj], generation: int, previous: list[Obj], now: str,
            error: tuple[str, str] | None = None) -> Obj:
    """The status subresource. `error`: (reason, message) of a failed reconcile, shown as Degraded."""
    counts = pool_counts(model, children)
    conditions, not_ready = [], []
    for pool, count in counts.items():
        ok = count["readyReplicas"] >= count["replicas"]
        if not ok:
            not_ready.append(pool)
        message = f"{count['readyReplicas']}/{count['replicas']} ready"
        conditions.append(condition(POOL_CONDITIONS[pool], ok, "ReplicasReady" if ok else "ReplicasNotReady",
                                    message, generation, previous, now))
    ready = not not_ready and error is None
    conditions.append(condition("Ready", ready, "AllPoolsReady" if ready else "PoolsNotReady",
                                "all pools ready" if ready else "not ready: " + ", ".join(not_ready or ["-"]),
                                generation, previous, now))
    conditions.append(condition("Progressing", bool(not_ready) and error is None,
                                "RollingOut" if not_ready else "Reconciled",
                                "waiting for " + ", ".join(not_ready) if not_ready else "children match the spec",
                                generation, previous, now))
    reason, message = error or ("Reconciled", "")
    conditions.append(condition("Degraded", error is not None, reason, message, generation, previous, now))
    gone = {pool: None for pool in POOL_CONDITIONS if pool not in counts}  # null: a merge patch removes it
    return {"observedGeneration": generation, "gatewayURL": gateway_url(model),
            "readyPools": f"{len(counts) - len(not_ready)}/{len(counts)}", **counts, **gone,
            "conditions": conditions}
