"""Make the cluster hold exactly the children the builders return: create what is missing (a 409 becomes
a patch), patch what differs (by the content hash: an unchanged child is not patched), rebuild a group
whose shape changed, and delete the children the spec no longer asks for."""
from __future__ import annotations

import logging

from tandem.operator.common import HASH_ANNOTATION, MANAGED_BY, MODEL_LABEL, Obj
from tandem.operator.kube import ConflictError, Kube
from tandem.operator.pools import LWS_API_VERSION
from tandem.operator.spec import TandemModel

log = logging.getLogger(__name__)
CHILD_KINDS = [("v1", "ConfigMap"), ("v1", "Service"), ("apps/v1", "Deployment"), ("apps/v1", "StatefulSet")]
LWS_KIND = (LWS_API_VERSION, "LeaderWorkerSet")
# fields the API server allocates once and keeps: carried over when a Service's spec is replaced
ALLOCATED_SERVICE_FIELDS = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy")


def rebuilt_on_change(existing: Obj, desired: Obj) -> bool:
    """A StatefulSet group is replaced whole (its members must agree on the group); a LeaderWorkerSet
    rolls its groups itself, unless their size changes."""
    if desired["kind"] == "StatefulSet":
        return True
    if desired["kind"] == "LeaderWorkerSet":
        size = lambda obj: obj["spec"]["leaderWorkerTemplate"]["size"]  # noqa: E731
        return size(existing) != size(desired)
    return False


def patch_ops(existing: Obj, desired: Obj) -> list[Obj]:
    """JSON patch ops that give `existing` the desired labels, owner and content, keeping others'
    annotations and what the server allocated."""
    meta = existing["metadata"]
    annotations = {**(meta.get("annotations") or {}), **desired["metadata"].get("annotations", {})}
    ops = [{"op": "add", "path": "/metadata/labels", "value": desired["metadata"]["labels"]},
           {"op": "add", "path": "/metadata/annotations", "value": annotations},
           {"op": "add", "path": "/metadata/ownerReferences", "value": desired["metadata"]["ownerReferences"]}]
    field = "data" if desired["kind"] == "ConfigMap" else "spec"
    value = dict(desired[field])
    if desired["kind"] == "Service":
        value.update({key: existing["spec"][key] for key in ALLOCATED_SERVICE_FIELDS
                      if key in existing.get("spec", {}) and key not in value})
    return [*ops, {"op": "add", "path": f"/{field}", "value": value}]


def apply_child(kube: Kube, desired: Obj) -> str:
    """Create or update one child; returns what was done (created, patched, rebuilt, unchanged, waiting)."""
    try:
        kube.create(desired)
        return "created"
    except ConflictError:
        pass
    meta = desired["metadata"]
    existing = kube.get(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"])
    if existing is None:  # deleted meanwhile: its deletion event reconciles again
        return "waiting"
    if existing["metadata"].get("deletionTimestamp"):  # still going (a group being rebuilt)
        return "waiting"
    if (existing["metadata"].get("annotations") or {}).get(HASH_ANNOTATION) == meta["annotations"][HASH_ANNOTATION]:
        return "unchanged"
    if rebuilt_on_change(existing, desired):
        # foreground: the old group's pods are gone before the new group starts
        kube.delete(desired["apiVersion"], desired["kind"], meta["namespace"], meta["name"], "Foreground")
        try:
            kube.create(desired)
        except ConflictError:
            return "waiting"  # recreated when the old one's deletion event arrives
        return "rebuilt"
    kube.patch(existing, patch_ops(existing, desired))
    return "patched"


def child_kinds(lws: bool) -> list[tuple[str, str]]:
    return [*CHILD_KINDS, LWS_KIND] if lws else CHILD_KINDS


def delete_stale(kube: Kube, model: TandemModel, desired: list[Obj], lws: bool) -> list[str]:
    """Delete the children this TandemModel owns that the spec no longer asks for (e.g. groups past the
    replica count, a Deployment replaced by groups). Returns 'Kind/name' of each."""
    wanted = {(obj["kind"], obj["metadata"]["name"]) for obj in desired}
    selector = {MODEL_LABEL: model.owner.name, "app.kubernetes.io/managed-by": MANAGED_BY}
    deleted = []
    for api_version, kind in child_kinds(lws):
        for obj in kube.list(api_version, kind, model.owner.namespace, selector):
            meta = obj["metadata"]
            owned = any(ref.get("uid") == model.owner.uid for ref in meta.get("ownerReferences") or [])
            if owned and (kind, meta["name"]) not in wanted and not meta.get("deletionTimestamp"):
                kube.delete(api_version, kind, model.owner.namespace, meta["name"])
                deleted.append(f"{kind}/{meta['name']}")
    return deleted


def reconcile(kube: Kube, model: TandemModel, desired: list[Obj], lws: bool) -> dict[str, str]:
    """Apply every desired child and delete the stale ones: 'Kind/name' -> what was done."""
    done = {f"{obj['kind']}/{obj['metadata']['name']}": apply_child(kube, obj) for obj in desired}
    done.update({key: "deleted" for key in delete_stale(kube, model, desired, lws)})
    changed = {key: action for key, action in done.items() if action != "unchanged"}
    if changed:
        log.info("TandemModel %s/%s: %s", model.owner.namespace, model.owner.name, changed)
    return done
