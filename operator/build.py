"""Every child object of a TandemModel, from its spec alone: pure and deterministic (the same spec gives
the same objects), each with an owner reference and the hash of its content."""
from __future__ import annotations

from tandem.operator import kvstore, pools, router
from tandem.operator.common import Obj, with_hash
from tandem.operator.spec import TandemModel


def build_children(model: TandemModel, lws: bool = False) -> list[Obj]:
    """`lws`: the cluster serves leaderworkerset.x-k8s.io/v1, so multi-pod groups are LeaderWorkerSets."""
    children = [*router.build(model), *pools.build(model, "prefill", lws), *pools.build(model, "decode", lws),
                *kvstore.build(model)]
    return [with_hash(child) for child in children]
