"""The operator's access to the Kubernetes API: the kubernetes client's DynamicClient, which takes the
builders' plain dicts whatever their kind."""
from __future__ import annotations

import os
import tempfile
from typing import Any

from kubernetes import client, config
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError

Obj = dict[str, Any]
__all__ = ["ConflictError", "Kube", "NotFoundError", "connect"]


def connect() -> DynamicClient:
    """In a pod, its service account; elsewhere the kubeconfig (as kopf logs in: the same credentials).
    API discovery starts afresh at each start: the cluster's resources may have changed since."""
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    cache = os.path.join(tempfile.mkdtemp(prefix="tandem-operator-"), "discovery.json")
    return DynamicClient(client.ApiClient(), cache_file=cache)


def _plain(_client: DynamicClient, data: Obj) -> Obj:
    """The response as the server sent it: a dict, not the client's attribute-access wrapper."""
    return data


def matches(obj: Obj, selector: dict[str, str]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in selector.items())


class Kube:
    """Get, list, create, patch and delete objects as dicts."""

    def __init__(self, dynamic: DynamicClient):
        self.dynamic = dynamic

    def _resource(self, api_version: str, kind: str):
        return self.dynamic.resources.get(api_version=api_version, kind=kind)

    def get(self, api_version: str, kind: str, namespace: str, name: str) -> Obj | None:
        try:
            return self._resource(api_version, kind).get(name=name, namespace=namespace, serializer=_plain)
        except NotFoundError:
            return None

    def list(self, api_version: str, kind: str, namespace: str, selector: dict[str, str]) -> list[Obj]:
        label_selector = ",".join(f"{key}={value}" for key, value in sorted(selector.items()))
        items = self._resource(api_version, kind).get(namespace=namespace, label_selector=label_selector,
                                                      serializer=_plain)
        # checked here too: whatever the server answered, nothing outside the selector is acted on
        return [item for item in items.get("items") or [] if matches(item, selector)]

    def create(self, obj: Obj) -> Obj:
        meta = obj["metadata"]
        return self._resource(obj["apiVersion"], obj["kind"]).create(body=obj, namespace=meta["namespace"],
                                                                      serializer=_plain)

    def patch(self, obj: Obj, ops: list[Obj]) -> Obj:
        """A JSON patch (RFC 6902): whole fields replaced, so keys dropped from the spec go away."""
        meta = obj["metadata"]
        return self._resource(obj["apiVersion"], obj["kind"]).patch(
            body=ops, name=meta["name"], namespace=meta["namespace"],
            content_type="application/json-patch+json", serializer=_plain)

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str, status: Obj) -> None:
        """Merge `status` into the object's status; nothing if the object is gone."""
        try:
            self._resource(api_version, kind).status.patch(
                body={"status": status}, name=name, namespace=namespace,
                content_type="application/merge-patch+json", serializer=_plain)
        except NotFoundError:
            pass

    def delete(self, api_version: str, kind: str, namespace: str, name: str, propagation: str = "Background") -> None:
        try:
            self._resource(api_version, kind).delete(name=name, namespace=namespace, propagation_policy=propagation,
                                                     serializer=_plain)
        except NotFoundError:
            pass

    def serves(self, api_version: str, plural: str) -> bool:
        """Whether API discovery lists the resource (e.g. a CRD that may or may not be installed)."""
        try:
            listing = self.dynamic.request("GET", f"/apis/{api_version}", serializer=_plain)
        except NotFoundError:
            return False
        return any(resource["name"] == plural for resource in listing.get("resources") or [])
