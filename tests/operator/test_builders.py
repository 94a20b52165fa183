"""The builders: every child validates against the Kubernetes 1.30 schemas, is owned by its TandemModel,
comes out the same for the same spec, and runs commands the services really accept."""
from __future__ import annotations

import base64

import pytest
import yaml

from tandem.cli import parse_args
from tandem.operator.build import build_children
from tests.operator.conftest import SPECS, model_of, validate_k8s


def by_name(children: list[dict]) -> dict[str, dict]:
    return {f"{c['kind']}/{c['metadata']['name']}": c for c in children}


def containers(children: list[dict]) -> dict[str, dict]:
    """The main container of each workload, by workload name."""
    out = {}
    for child in children:
        spec = child.get("spec", {})
        template = spec.get("template") or spec.get("leaderWorkerTemplate", {}).get("workerTemplate")
        if template:
            (container,) = template["spec"]["containers"]
            out[child["metadata"]["name"]] = container
    return out


def env_of(container: dict) -> dict[str, str | dict]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("lws", [False, True])
def test_children_validate_and_are_owned(spec_name, lws):
    children = build_children(model_of(SPECS[spec_name]), lws=lws)
    assert len(by_name(children)) == len(children)
    for child in children:
        validate_k8s(child)
        (ref,) = child["metadata"]["ownerReferences"]
        assert ref == {"apiVersion": "tandem.dev/v1alpha1", "kind": "TandemModel", "name": "m1", "uid": "uid-1",
                       "controller": True, "blockOwnerDeletion": True}
        assert child["metadata"]["namespace"] == "models"
        assert child["metadata"]["labels"]["tandem.dev/model"] == "m1"


def test_builders_are_pure_and_deterministic(spec_name):
    spec = SPECS[spec_name]
    first = build_children(model_of(spec))
    reordered = {key: spec[key] for key in reversed(list(spec))}
    assert build_children(model_of(reordered)) == first
    assert build_children(model_of(spec, uid="uid-2")) != first  # the owner is part of every child


def test_cpu_default_is_router_and_one_pod_pools():
    children = by_name(build_children(model_of({})))
    assert sorted(children) == ["ConfigMap/m1-router-config", "Deployment/m1-decode", "Deployment/m1-prefill",
                                "Deployment/m1-router", "Service/m1-decode", "Service/m1-prefill", "Service/m1-router"]
    assert children["Service/m1-prefill"]["spec"]["clusterIP"] == "None"  # one address per worker
    assert "nvidia.com/gpu" not in str(children["Deployment/m1-decode"])
    assert "TANDEM_GROUP_SECRET" not in str(children)  # no group, no key
    config = yaml.safe_load(children["ConfigMap/m1-router-config"]["data"]["router.yaml"])
    assert config == {"prefill_workers": "m1-prefill.models.svc.cluster.local:50052",
                      "decode_workers": "m1-decode.models.svc.cluster.local:50052"}


def test_services_accept_the_command_lines_and_the_router_config(spec_name, tmp_path):
    """Each container's args parse with `tandem`'s own parser; the router reads its mounted config."""
    children = build_children(model_of(SPECS[spec_name]))
    config = next(c for c in children if c["kind"] == "ConfigMap")["data"]["router.yaml"]
    (tmp_path / "router.yaml").write_text(config)
    for name, container in containers(children).items():
        args = [str(tmp_path / "router.yaml") if a == "/etc/tandem/router.yaml" else a for a in container["args"]]
        _, parsed = parse_args(args)
        assert parsed.command == args[0], name
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            # a router without a live decode worker is not ready, but alive: only readiness reads /health
            live = "/version" if args[0] == "router" and probe != "readinessProbe" else "/health"
            assert container[probe]["httpGet"]["path"] == live, (name, probe)
            assert container[probe]["httpGet"]["port"] in ports
        if args[0] == "kvstore":
            assert (parsed.port, parsed.http_port) == (ports["grpc"], ports["metrics"]) == (50060, 8080)
            assert parsed.capacity_bytes >= 1 << 30
        elif args[0] == "router":
            assert (parsed.port, parsed.grpc_port) == (ports["http"], ports["grpc"]) == (8000, 50051)
            assert parsed.prefill_workers == ["m1-prefill.models.svc.cluster.local:50052"]
            assert parsed.decode_workers == ["m1-decode.models.svc.cluster.local:50052"]
        else:
            assert (parsed.port, parsed.http_port) == (ports["grpc"], ports["metrics"]) == (50052, 8080)
            assert parsed.router == "m1-router.models.svc:50051"
            # decode's KV receiver listens on a fixed port the pod declares (prefill pods dial it)
            assert parsed.kv_port == (ports["kv"] if args[0] == "decode" else 0)
            assert {"POD_IP", "POD_NAME"} <= set(env_of(container))


def test_hf_source_router_settings_slo_and_kvstore():
    children = by_name(build_children(model_of(SPECS["cpu-hf-kvstore"])))
    config_map = children["ConfigMap/m1-router-config"]
    config = yaml.safe_load(config_map["data"]["router.yaml"])
    assert config["served_model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert (config["max_model_len"], config["local_prefill_threshold"]) == (2048, 64)
    assert yaml.safe_load(config_map["data"]["slo.yaml"]) == {"ttft_millis": 500}
    router = containers(children.values())["m1-router"]
    assert router["args"][:2] == ["router", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert children["Deployment/m1-router"]["spec"]["replicas"] == 2
    kv = children["Deployment/m1-kvstore"]
    (store,) = kv["spec"]["template"]["spec"]["containers"]
    assert store["args"] == ["kvstore", "--port", "50060", "--http-port", "8080", "--capacity-bytes", "8Gi"]
    assert "volumes" not in kv["spec"]["template"]["spec"]  # no diskCapacity: no disk tier
    assert [p["name"] for p in children["Service/m1-kvstore"]["spec"]["ports"]] == ["grpc", "metrics"]
    decode = containers(children.values())["m1-decode"]
    assert env_of(decode)["TANDEM_KVSTORE_ADDRESS"] == "m1-kvstore.models.svc.cluster.local:50060"
    assert env_of(router)["TANDEM_KVSTORE_ADDRESS"] == env_of(decode)["TANDEM_KVSTORE_ADDRESS"]  # it follows the store
    assert "TANDEM_KVSTORE_ADDRESS" not in env_of(containers(build_children(model_of({})))["m1-decode"])


def test_kvstore_disk_tier_is_an_emptydir_with_room_for_the_files():
    children = by_name(build_children(model_of(SPECS["gpu-groups"])))
    pod = children["Deployment/m1-kvstore"]["spec"]["template"]["spec"]
    (store,) = pod["containers"]
    _, parsed = parse_args(store["args"])
    assert (parsed.capacity_bytes, parsed.disk_capacity_bytes) == (16 << 30, 100 << 30)
    assert parsed.disk_dir == "/var/cache/tandem/kvstore"
    assert store["volumeMounts"] == [{"name": "kv-disk", "mountPath": parsed.disk_dir}]
    (volume,) = pod["volumes"]
    # the kubelet evicts a pod over its sizeLimit: it must exceed what the store writes
    assert (100 << 30) < int(volume["emptyDir"]["sizeLimit"]) <= (100 << 30) * 1.1
    assert store["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}


def test_router_config_change_rolls_the_routers():
    def config_hash(spec):
        deployment = by_name(build_children(model_of(spec)))["Deployment/m1-router"]
        return deployment["spec"]["template"]["metadata"]["annotations"]["tandem.dev/config-hash"]
    assert config_hash({}) != config_hash({"router": {"localPrefillThreshold": 1}})


def test_single_pod_gpu_pools_are_deployments_with_gpus_and_the_claim():
    children = by_name(build_children(model_of(SPECS["gpu-single-pod"])))
    decode = children["Deployment/m1-decode"]
    pod = decode["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert decode["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    assert pod["containers"][0]["args"][:2] == ["decode", "/models/llama-8b"]
    for pool in ("prefill", "decode"):  # every worker serves the adapters, from the claim
        args = children[f"Deployment/m1-{pool}"]["spec"]["template"]["spec"]["containers"][0]["args"]
        at = args.index("--lora-modules")
        assert args[at + 1:at + 3] == ["sql=/models/adapters/sql", "chat=/models/adapters/chat"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert env_of(pod["containers"][0])["TANDEM_TENSOR_PARALLEL_SIZE"] == "8"
    assert not any(c["kind"] in ("StatefulSet", "LeaderWorkerSet") for c in children.values())


def test_multi_pod_replicas_become_statefulset_groups_with_leader_addresses():
    children = by_name(build_children(model_of(SPECS["gpu-groups"]), lws=False))
    # decode: TP8 x PP4 on 8-GPU pods = 4 pods a group; 3 groups wanted, autoscaling caps them at 2
    groups = [c for key, c in children.items() if key.startswith("StatefulSet/m1-decode-")]
    assert [g["metadata"]["name"] for g in groups] == ["m1-decode-0", "m1-decode-1"]
    for index, group in enumerate(groups):
        spec = group["spec"]
        assert (spec["replicas"], spec["serviceName"], spec["podManagementPolicy"]) == (4, "m1-decode-group", "Parallel")
        env = env_of(spec["template"]["spec"]["containers"][0])
        assert env["TANDEM_GROUP_SIZE"] == "4" and env["TANDEM_GROUP_INDEX"] == str(index)
        assert env["TANDEM_LEADER_ADDRESS"] == f"m1-decode-{index}-0.m1-decode-group.models.svc.cluster.local"
        assert env["TANDEM_WORKER_INDEX"] == {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}
        assert env["TANDEM_GROUP_SECRET"] == {"secretKeyRef": {"name": "m1-group-key", "key": "key"}}
        assert spec["template"]["metadata"]["labels"]["tandem.dev/group-index"] == str(index)
        assert spec["selector"]["matchLabels"]["tandem.dev/group-index"] == str(index)
        assert len(group["metadata"]["name"] + "-123-") + 10 <= 63  # pod names and revision-hash labels fit
    members = children["Service/m1-decode-group"]["spec"]
    assert members["clusterIP"] == "None" and members["publishNotReadyAddresses"]
    serving = children["Service/m1-decode"]["spec"]["selector"]
    assert serving["apps.kubernetes.io/pod-index"] == "0"  # the router sees only leaders
    assert len([k for k in children if k.startswith("StatefulSet/m1-prefill-")]) == 2
    assert "Deployment/m1-decode" not in children


def test_multi_pod_replicas_become_leaderworkersets_where_installed():
    children = by_name(build_children(model_of(SPECS["gpu-groups"]), lws=True))
    lws = children["LeaderWorkerSet/m1-decode-group"]["spec"]
    assert (lws["replicas"], lws["leaderWorkerTemplate"]["size"]) == (2, 4)
    assert lws["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
    env = env_of(lws["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0])
    assert env["TANDEM_LEADER_ADDRESS"] == "m1-decode-group-$(TANDEM_GROUP_INDEX).m1-decode-group.models.svc.cluster.local"
    names = [e["name"] for e in lws["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["env"]]
    assert names.index("TANDEM_GROUP_INDEX") < names.index("TANDEM_LEADER_ADDRESS")  # $(VAR) needs it first
    assert env["TANDEM_GROUP_SECRET"] == {"secretKeyRef": {"name": "m1-group-key", "key": "key"}}
    assert children["Service/m1-decode"]["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    assert not any(c["kind"] == "StatefulSet" for c in children.values())
    assert "Service/m1-decode-group" not in children  # the LeaderWorkerSet makes its own


@pytest.mark.parametrize("lws", [False, True])
def test_the_longest_name_fits_every_generated_name(lws):
    """Names of pods and of their controller-revision-hash labels (<statefulset>-<10 chars>) stay within
    63 characters for a 30-character TandemModel with groups of up to 3-digit indexes."""
    children = build_children(model_of(SPECS["gpu-groups"], name="m" * 30), lws=lws)
    for child in children:
        name = child["metadata"]["name"]
        assert len(name) <= 63
        if child["kind"] == "StatefulSet":  # pods <name>-<ordinal>
            assert len(f"{name}-999") + 11 <= 63
        if child["kind"] == "LeaderWorkerSet":  # worker StatefulSets <name>-<group>, pods <name>-<group>-<worker>
            assert len(f"{name}-999-999") + 11 <= 63


def test_the_group_key_secret_validates_and_is_needed_only_by_groups():
    from tandem.operator import group_key

    groups, single = model_of(SPECS["gpu-groups"]), model_of(SPECS["gpu-single-pod"])
    secret = group_key.secret(groups, "k" * 43)
    validate_k8s(secret)
    assert secret["metadata"]["name"] == "m1-group-key" and base64.b64decode(secret["data"]["key"]) == b"k" * 43
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert group_key.needed(groups) and not group_key.needed(single)
