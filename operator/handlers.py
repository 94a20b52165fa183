"""The kopf handlers: thin, they parse, build, reconcile and report. A TandemModel is reconciled when it
is created, changed or found at start (resume), and when one of its children is deleted (restored);
its status follows its workloads' events. A model whose groups span pods also gets their key's Secret
(group_key.py), made once and never patched, and made again if it is deleted (at the next event of a
workload of the model: pods that cannot read it change their workload's status). Deleting it needs nothing here: every child has an owner
reference, so the garbage collector deletes them (no finalizer)."""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable

import kopf
from pydantic import ValidationError

from tandem.operator import group_key, groups, status
from tandem.operator.build import build_children
from tandem.operator.common import GROUP_INDEX_LABEL, MANAGED_BY, MODEL_LABEL, Obj
from tandem.operator.kube import Kube, connect
from tandem.operator.pools import LWS_API_VERSION
from tandem.operator.reconcile import child_kinds, reconcile
from tandem.operator.spec import GROUP, KIND, PLURAL, VERSION, TandemModel

API_VERSION = f"{GROUP}/{VERSION}"
CHILDREN = {"app.kubernetes.io/managed-by": MANAGED_BY, MODEL_LABEL: kopf.PRESENT}


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # kopf's bookkeeping in annotations: the CRD's status schema has no room for it
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    if getattr(memo, "kube", None) is None:
        memo.kube = Kube(connect())
    if getattr(memo, "default_image", None) is None:
        memo.default_image = os.environ.get("TANDEM_IMAGE", "tandem:latest")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


Publish = Callable[[Obj], None]


def live_model(kube: Kube, namespace: str, name: str, uid: str) -> Obj | None:
    """The TandemModel as it is now, unless it is gone, going, or another one of the same name."""
    current = kube.get(API_VERSION, KIND, namespace, name)
    if current is None or current["metadata"].get("deletionTimestamp") or current["metadata"].get("uid") != uid:
        return None
    return current


def current_status(kube: Kube, model: TandemModel, body: Obj, lws: bool,
                   error: tuple[str, str] | None = None) -> Obj | None:
    """The status computed from the children now in the cluster, or None when it has not changed."""
    selector = {MODEL_LABEL: model.owner.name}
    children = [obj for api_version, kind in child_kinds(lws)
                for obj in kube.list(api_version, kind, model.owner.namespace, selector)
                if not obj["metadata"].get("deletionTimestamp")]  # a group being rebuilt is not ready
    old = body.get("status") or {}
    new = status.compute(model, children, body["metadata"].get("generation", 0), old.get("conditions") or [],
                         now(), error)
    return None if {key: old.get(key) for key in new} == new else new


def sync(memo: kopf.Memo, body: Obj, publish: Publish) -> None:
    """Reconcile one TandemModel's children and publish its new status (also when reconciling fails)."""
    kube: Kube = memo.kube
    body = live_model(kube, body["metadata"]["namespace"], body["metadata"]["name"], body["metadata"]["uid"])
    if body is None:
        return  # deleted meanwhile (an event handled late): its children go with it
    meta = body["metadata"]
    try:
        model = TandemModel.from_body(body, memo.default_image)
    except ValidationError as exc:
        degraded = status.condition("Degraded", True, "InvalidSpec", str(exc), meta.get("generation", 0),
                                    (body.get("status") or {}).get("conditions") or [], now())
        publish({"conditions": [degraded]})
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    lws = kube.serves(LWS_API_VERSION, "leaderworkersets")
    try:
        group_key.ensure(kube, model)  # before the groups, whose pods read it
        reconcile(kube, model, build_children(model, lws), lws)
    except Exception as exc:  # noqa: BLE001 - shown as Degraded, then kopf retries
        if new := current_status(kube, model, body, lws, ("ReconcileFailed", f"{type(exc).__name__}: {exc}")):
            publish(new)
        raise kopf.TemporaryError(f"reconcile failed: {exc}", delay=10) from exc
    if new := current_status(kube, model, body, lws):
        publish(new)


def api_publisher(kube: Kube, body: Obj) -> Publish:
    meta = body["metadata"]
    return lambda new: kube.patch_status(API_VERSION, KIND, meta["namespace"], meta["name"], new)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def tandem_model_changed(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_) -> None:
    def publish(new: Obj) -> None:  # with kopf's own patch of the object: one write, one event
        patch["status"] = new

    sync(memo, dict(body), publish)


def owning_model(kube: Kube, child: Obj) -> Obj | None:
    """The live TandemModel that owns `child`, if any."""
    meta = child["metadata"]
    for ref in meta.get("ownerReferences") or []:
        if ref.get("kind") == KIND and ref.get("name") == meta["labels"][MODEL_LABEL]:
            return live_model(kube, meta["namespace"], ref["name"], ref["uid"])
    return None


@kopf.on.event("apps", "v1", "deployments", labels=CHILDREN)
@kopf.on.event("apps", "v1", "statefulsets", labels=CHILDREN)
@kopf.on.event("leaderworkerset.x-k8s.io", "v1", "leaderworkersets", labels=CHILDREN)
@kopf.on.event("", "v1", "services", labels=CHILDREN)
@kopf.on.event("", "v1", "configmaps", labels=CHILDREN)
def child_changed(event: kopf.RawEvent, body: kopf.Body, memo: kopf.Memo, **_) -> None:
    """A deleted child is restored; a workload's change updates its TandemModel's status."""
    deleted = event["type"] == "DELETED"
    if not deleted and body["kind"] not in ("Deployment", "StatefulSet", "LeaderWorkerSet"):
        return
    owner = owning_model(memo.kube, dict(body))
    if owner is None:
        return
    if deleted:
        sync(memo, owner, api_publisher(memo.kube, owner))
    else:
        try:
            model = TandemModel.from_body(owner, memo.default_image)
        except ValidationError:
            return  # reported by the TandemModel's own handler
        # a group key deleted by hand is made again when its pods fail to start (their workload changes)
        group_key.ensure(memo.kube, model)
        if new := current_status(memo.kube, model, owner, memo.kube.serves(LWS_API_VERSION, "leaderworkersets")):
            api_publisher(memo.kube, owner)(new)


@kopf.on.event("", "v1", "pods", labels={"app.kubernetes.io/managed-by": MANAGED_BY, GROUP_INDEX_LABEL: kopf.PRESENT})
def group_member_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_) -> None:
    pod = dict(body)
    if groups.member_failed(pod):
        restarted = groups.restart_group(memo.kube, pod)
        logger.warning("group member %s failed: restarting its group %s", pod["metadata"]["name"], restarted)
