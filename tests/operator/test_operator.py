"""The operator's handlers driven by kopf against kmock's Kubernetes API emulator. No API server can run
here, and kmock is the best available: it stores objects, serves discovery, lists and watch streams,
and applies merge and JSON patches, but it runs no controllers (no garbage collector, no Deployment or
StatefulSet controller), does not bump metadata.generation, sets no resourceVersion (so kopf may run a
handler again on its own status events: the reconcile is idempotent) and ignores label selectors. The
tests stand in for the missing parts: they bump generations, mark workloads ready and delete what the
garbage collector would, and resourceVersions are added to kmock (VersionedEmulator)."""
from __future__ import annotations

import asyncio
import base64
import itertools
import os
import sys
import threading
import time

import aiohttp

import kmock as kmocklib
import kopf
import pytest
import pytest_asyncio
import yaml
from kubernetes.config import kube_config

import tandem.operator.handlers  # noqa: F401 - registers the handlers
from tandem.worker.process import free_port
from tests.operator.conftest import GPU_POOL



class VersionedEmulator(kmocklib.KubernetesEmulator):
    """kmock plus what kopf needs from an API server to skip the events of its own writes that it has
    already seen: a resourceVersion that changes on every create and patch."""
    versions = itertools.count(1)

    async def _handle(self, request):
        if request.resource is not None and request.action in (kmocklib.action.CREATE, kmocklib.action.UPDATE):
            version = str(next(self.versions))
            if isinstance(request.data, dict):
                request.data.setdefault("metadata", {})["resourceVersion"] = version
            elif isinstance(request.data, list):  # a JSON patch
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
        return await super()._handle(request)


pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60), pytest.mark.kmock(cls=VersionedEmulator)]
NS = "default"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
RESOURCES = {
    "tandem.dev/v1alpha1/tandemmodels": ("TandemModel", True, {"status"}),
    "apps/v1/deployments": ("Deployment", True, {"status", "scale"}),
    "apps/v1/statefulsets": ("StatefulSet", True, {"status", "scale"}),
    "v1/services": ("Service", True, {"status"}),
    "v1/configmaps": ("ConfigMap", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/events": ("Event", True, set()),
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
PATHS = {"TandemModel": f"/apis/tandem.dev/v1alpha1/namespaces/{NS}/tandemmodels",
         "Deployment": f"/apis/apps/v1/namespaces/{NS}/deployments",
         "StatefulSet": f"/apis/apps/v1/namespaces/{NS}/statefulsets",
         "LeaderWorkerSet": f"/apis/leaderworkerset.x-k8s.io/v1/namespaces/{NS}/leaderworkersets",
         "Service": f"/api/v1/namespaces/{NS}/services", "ConfigMap": f"/api/v1/namespaces/{NS}/configmaps",
         "Secret": f"/api/v1/namespaces/{NS}/secrets",
         "Pod": f"/api/v1/namespaces/{NS}/pods"}
RESOURCE_OF = {"TandemModel": "tandem.dev/v1alpha1/tandemmodels", "Deployment": "apps/v1/deployments",
               "StatefulSet": "apps/v1/statefulsets", "Service": "v1/services", "ConfigMap": "v1/configmaps",
               "Secret": "v1/secrets", "Pod": "v1/pods", "LeaderWorkerSet": LWS}


def declare(kmock, resource: str, kind: str, namespaced: bool, subresources: set[str]) -> None:
    kmock.resources[resource] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                   subresources=subresources)


@pytest.fixture
def cluster(kmock, tmp_path, monkeypatch):
    """kmock as the cluster, reached the way the operator reaches a real one: through a kubeconfig."""
    for resource, info in RESOURCES.items():
        declare(kmock, resource, *info)
    config = {"apiVersion": "v1", "kind": "Config", "current-context": "kmock",
              "clusters": [{"name": "kmock", "cluster": {"server": str(kmock.url).rstrip("/")}}],
              "users": [{"name": "kmock", "user": {"token": "test"}}],
              "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(config))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    return kmock


def start_operator(namespaces: list[str] | None = None) -> tuple[threading.Event, threading.Thread]:
    """`tandem operator --all-namespaces` (or `--namespace` each of `namespaces`) as it runs in its pod
    (kopf.run, its own event loop), in a thread."""
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # kmock serves no CRD watch
    stop = threading.Event()
    thread = threading.Thread(target=kopf.run, daemon=True, kwargs=dict(
        clusterwide=namespaces is None, namespaces=namespaces or (), standalone=True, settings=settings,
        stop_flag=stop, memo=kopf.Memo(default_image="tandem:test")))
    thread.start()
    return stop, thread


async def stop_operator(stop: threading.Event, thread: threading.Thread) -> None:
    stop.set()
    await asyncio.to_thread(thread.join, 20)  # the mock server keeps answering meanwhile
    assert not thread.is_alive()


@pytest_asyncio.fixture
async def operator(cluster):
    stop, thread = start_operator()
    yield cluster
    await stop_operator(stop, thread)


def live(kmock, kind: str, name: str) -> dict | None:
    try:
        stored = kmock.objects[RESOURCE_OF[kind], NS, name]
    except KeyError:
        return None
    return None if stored.deleted else stored.raw


async def wait_for(check, timeout: float = 15.0):
    """Poll `check` until it returns something truthy; fail with its last value after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {check.__doc__ or check}")
        await asyncio.sleep(0.05)
    return result


async def call(kmock, method: str, kind: str, name: str = "", body=None, sub: str = "") -> None:
    path = "/".join(p for p in (PATHS[kind], name, sub) if p)
    async with kmock.request(method, path, json=body, headers={"Content-Type": "application/merge-patch+json"}) as r:
        assert r.status < 300, (method, path, r.status, await r.text())


async def create_model(kmock, spec: dict, name: str = "m1", namespace: str = NS) -> None:
    body = {"apiVersion": "tandem.dev/v1alpha1", "kind": "TandemModel",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": 1}, "spec": spec}
    await call(kmock, "POST", "TandemModel", body=body)


async def change_spec(kmock, spec_patch: dict, generation: int, name: str = "m1") -> None:
    """A spec change as the API server makes it: merged, with the generation bumped."""
    await call(kmock, "PATCH", "TandemModel", name, {"metadata": {"generation": generation}, "spec": spec_patch})


def requests_to(kmock, method: str, kind: str, name: str) -> int:
    path = f"{PATHS[kind]}/{name}"
    return sum(1 for r in kmock if r.method == method and r.url.path == path)


def condition(kmock, kind: str, name: str = "m1") -> dict | None:
    status = (live(kmock, "TandemModel", name) or {}).get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), None)


CHILDREN = ["ConfigMap/m1-router-config", "Deployment/m1-router", "Service/m1-router", "Deployment/m1-prefill",
            "Service/m1-prefill", "Deployment/m1-decode", "Service/m1-decode", "Deployment/m1-kvstore",
            "Service/m1-kvstore"]


async def test_create_status_scale_restore_and_delete(operator):
    kmock = operator
    await create_model(kmock, {"kvStore": {"enabled": True}})

    def children():
        """every child, each owned by the TandemModel"""
        found = {key: live(kmock, *key.split("/")) for key in CHILDREN}
        return all(found.values()) and found
    found = await wait_for(children)
    for child in found.values():
        assert [ref["uid"] for ref in child["metadata"]["ownerReferences"]] == ["uid-m1"]

    def written(kind, status):
        return lambda: (c := condition(kmock, kind)) and c["status"] == status and c
    await wait_for(written("Ready", "False"))
    status = live(kmock, "TandemModel", "m1")["status"]
    assert status["gatewayURL"] == "http://m1-router.default.svc:8000"
    assert status["observedGeneration"] == 1 and status["readyPools"] == "0/4"
    assert condition(kmock, "Progressing")["status"] == "True" and condition(kmock, "Degraded")["status"] == "False"

    for name in ("m1-router", "m1-prefill", "m1-decode", "m1-kvstore"):  # what the Deployment controller reports
        await call(kmock, "PATCH", "Deployment", name, {"status": {"readyReplicas": 1}}, sub="status")
    ready = await wait_for(written("Ready", "True"))
    assert ready["reason"] == "AllPoolsReady" and condition(kmock, "DecodeReady")["status"] == "True"
    assert live(kmock, "TandemModel", "m1")["status"]["readyPools"] == "4/4"

    # scale: one Deployment patched in place, the others untouched
    await change_spec(kmock, {"decode": {"replicas": 3}}, generation=2)
    await wait_for(lambda: live(kmock, "Deployment", "m1-decode")["spec"]["replicas"] == 3)
    await wait_for(written("DecodeReady", "False"))
    assert live(kmock, "TandemModel", "m1")["status"]["observedGeneration"] == 2
    assert requests_to(kmock, "PATCH", "Deployment", "m1-decode") >= 1
    assert requests_to(kmock, "DELETE", "Deployment", "m1-decode") == 0
    assert requests_to(kmock, "PATCH", "Deployment", "m1-router") == 0  # unchanged: never patched

    # the KV store switched off: its pool leaves the status (a merge patch keeps what it does not null)
    await change_spec(kmock, {"kvStore": {"enabled": False}}, generation=3)
    await wait_for(lambda: "kvStore" not in live(kmock, "TandemModel", "m1")["status"])
    assert live(kmock, "TandemModel", "m1")["status"]["readyPools"].endswith("/3")

    # a child deleted by hand comes back
    await call(kmock, "DELETE", "Service", "m1-router")
    restored = await wait_for(lambda: live(kmock, "Service", "m1-router"))
    assert restored["spec"]["ports"][0]["port"] == 8000

    # delete: no finalizer holds the TandemModel; the garbage collector (played here) removes the children,
    # and the operator does not bring them back for an owner that is gone
    await call(kmock, "DELETE", "TandemModel", "m1")
    assert live(kmock, "TandemModel", "m1") is None
    await asyncio.sleep(0.5)  # the collector runs after the owner is gone, as handlers under way finish
    for key in CHILDREN:
        if live(kmock, *key.split("/")):
            await call(kmock, "DELETE", *key.split("/"))
    await asyncio.sleep(1.0)
    assert not any(live(kmock, *key.split("/")) for key in CHILDREN)


async def test_parallelism_change_rebuilds_groups(operator):
    kmock = operator
    pool = {**GPU_POOL, "gpusPerPod": 1, "tensorParallelSize": 2}  # 2 pods a replica, 2 replicas
    await create_model(kmock, {"prefill": pool})

    def groups(size: int, count: int):
        def check():
            """the prefill groups at the expected size"""
            sets = [live(kmock, "StatefulSet", f"m1-prefill-{i}") for i in range(count)]
            return all(s and s["spec"]["replicas"] == size for s in sets) and sets
        return check
    first = await wait_for(groups(2, 2))
    assert live(kmock, "Service", "m1-prefill-group") and live(kmock, "Deployment", "m1-prefill") is None
    serving = await wait_for(lambda: live(kmock, "Service", "m1-prefill"))
    assert serving["spec"]["selector"]["apps.kubernetes.io/pod-index"] == "0"

    key = live(kmock, "Secret", "m1-group-key")  # the key members prove they know: owned, random
    assert [r["uid"] for r in key["metadata"]["ownerReferences"]] == ["uid-m1"]
    assert len(base64.b64decode(key["data"]["key"])) >= 32
    env = {e["name"]: e for e in first[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TANDEM_GROUP_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "m1-group-key", "key": "key"}

    await change_spec(kmock, {"prefill": {"tensorParallelSize": 4}}, generation=2)
    rebuilt = await wait_for(groups(4, 2))
    env = {e["name"]: e.get("value") for e in rebuilt[0]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["TANDEM_GROUP_SIZE"] == "4" and env["TANDEM_TENSOR_PARALLEL_SIZE"] == "4"
    assert live(kmock, "Secret", "m1-group-key")["data"] == key["data"]  # one key for the model's life
    assert requests_to(kmock, "PATCH", "Secret", "m1-group-key") == 0

    await call(kmock, "DELETE", "Secret", "m1-group-key")  # deleted by hand: made again, with a new key, at the
    # next reconcile or workload event (here: its pods fail to start, their StatefulSet's status changes)
    await call(kmock, "PATCH", "StatefulSet", "m1-prefill-0", {"status": {"replicas": 4, "readyReplicas": 3}},
               sub="status")
    remade = await wait_for(lambda: live(kmock, "Secret", "m1-group-key"))
    assert remade["data"] != key["data"]
    assert first[0]["spec"]["template"] != rebuilt[0]["spec"]["template"]
    for name in ("m1-prefill-0", "m1-prefill-1"):  # deleted and created again, never patched
        assert requests_to(kmock, "DELETE", "StatefulSet", name) == 1
        assert requests_to(kmock, "PATCH", "StatefulSet", name) == 0

    await change_spec(kmock, {"prefill": {"replicas": 1}}, generation=3)
    await wait_for(lambda: live(kmock, "StatefulSet", "m1-prefill-1") is None)
    assert live(kmock, "StatefulSet", "m1-prefill-0")

    await change_spec(kmock, {"prefill": {"tensorParallelSize": 1}}, generation=4)  # fits one pod again
    await wait_for(lambda: live(kmock, "Deployment", "m1-prefill"))
    await wait_for(lambda: live(kmock, "StatefulSet", "m1-prefill-0") is None)
    await wait_for(lambda: live(kmock, "Service", "m1-prefill-group") is None)
    assert "apps.kubernetes.io/pod-index" not in live(kmock, "Service", "m1-prefill")["spec"]["selector"]


async def test_models_found_at_start_in_the_watched_namespace_only(cluster):
    kmock = cluster
    await create_model(kmock, {"image": "registry.example/tandem:2"})
    await create_model(kmock, {}, name="elsewhere", namespace="team-b")

    def image(name: str) -> str | None:
        deployment = live(kmock, "Deployment", name)
        return deployment and deployment["spec"]["template"]["spec"]["containers"][0]["image"]
    stop, thread = start_operator(namespaces=[NS])  # as `tandem operator --namespace default`
    try:
        await wait_for(lambda: image("m1-decode") == "registry.example/tandem:2")  # resumed
        await change_spec(kmock, {"image": "registry.example/tandem:3"}, generation=2)  # a new image rolls out
        await wait_for(lambda: image("m1-decode") == image("m1-router") == "registry.example/tandem:3")
    finally:
        await stop_operator(stop, thread)
    assert not any(key[1] == "team-b" and key[0].plural != "tandemmodels" for key in kmock.objects)


async def test_the_tandem_operator_command(cluster, tmp_path):
    """The real entry point, as the chart's Deployment runs it: a process, its kubeconfig, a liveness URL.
    Cluster-wide: with --namespace, kopf lists namespaces at /api/v1/namespaces, a path kmock cannot parse
    (the in-process test above covers --namespace, with kopf's namespace scanning off)."""
    kmock = cluster
    port = free_port()  # below the ephemeral range: no outgoing connection takes it before the process binds it
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "kubeconfig"), "TANDEM_IMAGE": "registry.example/tandem:1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tandem.cli", "operator", "--all-namespaces", f"--liveness=http://127.0.0.1:{port}/healthz",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        await create_model(kmock, {})
        router = await wait_for(lambda: live(kmock, "Deployment", "m1-router"), timeout=30)
        assert router["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/tandem:1"
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
    finally:
        process.terminate()  # SIGTERM, as the kubelet stops the pod
        output = (await asyncio.wait_for(process.communicate(), 20))[0].decode()
    assert process.returncode == 0, output


async def test_a_failed_member_restarts_its_whole_group(operator):
    kmock = operator

    async def member(group: int, index: int) -> str:
        name = f"m1-prefill-{group}-{index}"
        labels = {"app.kubernetes.io/managed-by": "tandem-operator", "tandem.dev/model": "m1",
                  "app.kubernetes.io/component": "prefill", "tandem.dev/group-index": str(group)}
        await call(kmock, "POST", "Pod", body={"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": name, "namespace": NS, "labels": labels}, "spec": {"containers": [{"name": "prefill"}]},
            "status": {"phase": "Running", "containerStatuses": [{"name": "prefill", "restartCount": 0}]}})
        return name
    group0 = [await member(0, 0), await member(0, 1)]
    other = await member(1, 0)
    await call(kmock, "PATCH", "Pod", group0[1], {"status": {"containerStatuses": [
        {"name": "prefill", "restartCount": 1}]}}, sub="status")
    await wait_for(lambda: not any(live(kmock, "Pod", name) for name in group0))
    await asyncio.sleep(0.5)
    assert live(kmock, "Pod", other)  # another group, healthy: left alone
    assert [requests_to(kmock, "DELETE", "Pod", name) for name in group0] == [1, 1]


async def test_leaderworkersets_are_used_where_installed(cluster):
    kmock = cluster
    declare(kmock, LWS, "LeaderWorkerSet", True, {"status"})
    stop, thread = start_operator()
    try:
        await create_model(kmock, {"decode": {**GPU_POOL, "tensorParallelSize": 16}})
        lws = await wait_for(lambda: live(kmock, "LeaderWorkerSet", "m1-decode-group"))
        assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2 and lws["spec"]["replicas"] == 2
        assert [r["uid"] for r in lws["metadata"]["ownerReferences"]] == ["uid-m1"]
        assert not any(key[0].plural == "statefulsets" for key in kmock.objects)

        await call(kmock, "PATCH", "LeaderWorkerSet", "m1-decode-group", {"status": {"readyReplicas": 2}}, sub="status")
        await wait_for(lambda: (c := condition(kmock, "DecodeReady")) and c["status"] == "True")

        await change_spec(kmock, {"decode": {"replicas": 3}}, generation=2)  # the LeaderWorkerSet rolls itself
        await wait_for(lambda: live(kmock, "LeaderWorkerSet", "m1-decode-group")["spec"]["replicas"] == 3)
        assert requests_to(kmock, "DELETE", "LeaderWorkerSet", "m1-decode-group") == 0

        await change_spec(kmock, {"decode": {"tensorParallelSize": 32}}, generation=3)  # a new group size
        await wait_for(lambda: (lws := live(kmock, "LeaderWorkerSet", "m1-decode-group"))
                       and lws["spec"]["leaderWorkerTemplate"]["size"] == 4)
        assert requests_to(kmock, "DELETE", "LeaderWorkerSet", "m1-decode-group") == 1
    finally:
        await stop_operator(stop, thread)


async def test_an_invalid_spec_is_reported_and_builds_nothing(operator):
    kmock = operator  # kmock does not validate: this is what a cluster without CEL checks would let through
    await create_model(kmock, {"autoscaling": {"decode": {"minReplicas": 4, "maxReplicas": 2}}})
    degraded = await wait_for(lambda: (c := condition(kmock, "Degraded")) and c["status"] == "True" and c)
    assert degraded["reason"] == "InvalidSpec" and "minReplicas must not exceed maxReplicas" in degraded["message"]
    assert not any(key[0].plural in ("deployments", "services", "configmaps") for key in kmock.objects)
