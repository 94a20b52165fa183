"""The key that the ranks of a group spanning pods prove they know before the leader takes them in
(TANDEM_GROUP_SECRET, multiprocessing's HMAC challenge: ranks unpickle what they send each other, so a
stranger that joined could run code in them).

One Secret per TandemModel, `<model>-group-key`, holding a random key. It is made once and never patched:
a new key would split a running group's members from those started later. The operator makes it again
(with a new key) if it is deleted, at the next event of one of the model's workloads (the operator may get
and create Secrets, never list or watch them, so it reads no other Secret); groups restart whole, so a
group's members always read one key. Owned by the TandemModel like every child, so it goes with it."""
from __future__ import annotations

import base64
import secrets

from tandem.operator.common import Obj, child_name, metadata
from tandem.operator.kube import ConflictError, Kube
from tandem.operator.spec import TandemModel

SECRET_KEY = "key"


def secret_name(model: TandemModel) -> str:
    return child_name(model, "group-key")


def needed(model: TandemModel) -> bool:
    return any(getattr(model.spec, pool).pods_per_replica > 1 for pool in ("prefill", "decode"))


def secret(model: TandemModel, key: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": metadata(model, secret_name(model), "group-key"),
            "data": {SECRET_KEY: base64.b64encode(key.encode()).decode()}}


def env(model: TandemModel) -> Obj:
    """The group members' TANDEM_GROUP_SECRET, read from the Secret (a pod waits until it exists)."""
    return {"name": "TANDEM_GROUP_SECRET",
            "valueFrom": {"secretKeyRef": {"name": secret_name(model), "key": SECRET_KEY}}}


def ensure(kube: Kube, model: TandemModel) -> str:
    """Make the model's Secret with a fresh key unless it exists: 'created', 'kept' or 'not needed'. One of that
    name that is not this model's (another object's, or a deleted model's that the garbage collector is taking)
    is an error, retried: its key is not one to hand this model's pods."""
    if not needed(model):
        return "not needed"
    # read first: it exists in the common case (every reconcile and workload event asks), one call
    found = kube.get("v1", "Secret", model.owner.namespace, secret_name(model))
    if found is None:
        try:
            kube.create(secret(model, secrets.token_urlsafe(32)))
            return "created"
        except ConflictError:  # made meanwhile: check whose it is
            found = kube.get("v1", "Secret", model.owner.namespace, secret_name(model))
    if found is None:
        raise RuntimeError(f"Secret {secret_name(model)} went away while it was being made; trying again")
    meta = found["metadata"]
    owners = [ref.get("uid") for ref in meta.get("ownerReferences") or []]
    if model.owner.uid not in owners or meta.get("deletionTimestamp"):
        raise RuntimeError(f"Secret {secret_name(model)} exists but is not this TandemModel's (or is being "
                           "deleted): its groups cannot be given their key")
    return "kept"
