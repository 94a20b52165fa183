"""The Helm chart, rendered and linted offline by the real Helm library: every object valid for Kubernetes 1.30
(or its CRD), least-privilege RBAC in both scopes, dashboards and rules single-sourced from deploy/."""
from __future__ import annotations

import json

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import CHART, CRD, ROOT, render, validate

EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def example_spec() -> dict:
    """The spec of the first TandemModel example (deploy/examples/)."""
    for path in EXAMPLES:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj.get("kind") == "TandemModel":
                return obj["spec"]
    pytest.fail("no TandemModel in deploy/examples/")


VARIANTS = {
    "defaults": {},
    "monitoring": {"serviceMonitors": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                                       "interval": "30s"},
                   "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
                   "dashboards": {"namespace": "monitoring", "annotations": {"grafana_folder": "Tandem"}}},
    "namespaced": {"watchNamespaces": ["team-a", "team-b"], "serviceMonitors": {"enabled": True}},
    "model": {"model": {"enabled": True, "name": "smollm2", "namespace": "models", "spec": "EXAMPLE"}},
    "bare": {"dashboards": {"enabled": False}, "operator": {"liveness": {"enabled": False}},
             "serviceAccount": {"create": False, "name": "existing"}, "rbac": {"create": False}},
}


def values_of(variant: str) -> dict:
    values = json.loads(json.dumps(VARIANTS[variant]))
    if variant == "model":
        values["model"]["spec"] = example_spec()
    return values


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o["kind"] == kind]


def operator_container(objs: list[dict]) -> dict:
    (deployment,) = by_kind(objs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("variant", VARIANTS)
def test_lint_is_clean(variant):
    report = helm.lint(CHART, values_of(variant), strict=True, namespace="tandem-system", kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is info ("icon is recommended")
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_validates(variant):
    objs = render(values_of(variant))
    assert objs
    for obj in objs:
        validate(obj)


def test_defaults_install_the_operator_and_dashboards_only():
    objs = render()
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ClusterRole", "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "ConfigMap",
                     "ConfigMap", "Deployment", "ServiceAccount"]
    container = operator_container(objs)
    assert container["args"][0] == "operator" and "--all-namespaces" in container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert container["image"] == "tandem:0.1.0"
    pod = by_kind(objs, "Deployment")[0]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and not container["securityContext"]["allowPrivilegeEscalation"]
    assert pod["serviceAccountName"] == by_kind(objs, "ServiceAccount")[0]["metadata"]["name"]


@pytest.mark.parametrize("variant", ["defaults", "namespaced", "bare"])
def test_operator_args_are_what_tandem_operator_takes(variant):
    from tandem.cli import build_parser

    container = operator_container(render(values_of(variant)))
    args = build_parser().parse_args(container["args"])
    assert args.func.__name__ == "cmd_operator"
    assert args.all_namespaces == (variant != "namespaced")
    assert args.namespaces == (["team-a", "team-b"] if variant == "namespaced" else None)
    assert args.liveness == (None if variant == "bare" else "http://0.0.0.0:8080/healthz")
    assert {"name": "TANDEM_IMAGE", "value": container["image"]} in container["env"]


# What the operator may do, and nothing more: (apiGroup, resource) -> verbs.
NAMESPACED_RULES = {
    ("tandem.dev", "tandemmodels"): {"get", "list", "watch", "patch"},
    ("tandem.dev", "tandemmodels/status"): {"patch"},
    # children's owner references set blockOwnerDeletion: OwnerReferencesPermissionEnforcement wants this
    ("tandem.dev", "tandemmodels/finalizers"): {"update"},
    ("apps", "deployments"): {"get", "list", "watch", "create", "patch", "delete"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("leaderworkerset.x-k8s.io", "leaderworkersets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "secrets"): {"get", "create"},  # groups' keys, made once (operator/group_key.py); never listed
    ("", "pods"): {"list", "watch", "delete"},
    ("", "events"): {"create"},
}
CLUSTER_RULES = {("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"}}


def permissions(role: dict) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def granted(objs: list[dict], binding_kind: str) -> dict[str, dict]:
    """Role name -> (namespace, permissions) for every role bound to the operator's ServiceAccount."""
    sa = by_kind(objs, "ServiceAccount")[0]["metadata"]
    roles = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")): o
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    out = {}
    for b in by_kind(objs, binding_kind):
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
        ns = b["metadata"].get("namespace")
        role = roles[(b["roleRef"]["kind"], b["roleRef"]["name"], ns if b["roleRef"]["kind"] == "Role" else None)]
        out[f"{ns}/{role['metadata']['name']}"] = permissions(role)
    return out


def test_cluster_wide_rbac_is_least_privilege():
    objs = render()
    assert not by_kind(objs, "Role") and not by_kind(objs, "RoleBinding")
    assert sorted(granted(objs, "ClusterRoleBinding").values(), key=len) == [CLUSTER_RULES, NAMESPACED_RULES]


def test_namespaced_rbac_grants_only_the_watched_namespaces():
    objs = render(values_of("namespaced"))
    assert list(granted(objs, "ClusterRoleBinding").values()) == [CLUSTER_RULES]  # CRDs are cluster objects
    roles = granted(objs, "RoleBinding")
    assert sorted(roles) == ["team-a/tandem-operator", "team-b/tandem-operator"]
    assert all(p == NAMESPACED_RULES for p in roles.values())
    args = operator_container(objs)["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args and "--all-namespaces" not in args


def test_no_rbac_and_an_existing_service_account():
    objs = render(values_of("bare"))
    assert sorted(o["kind"] for o in objs) == ["Deployment"]
    pod = objs[0]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "existing"
    assert "livenessProbe" not in pod["containers"][0]
    assert not any(a.startswith("--liveness") for a in pod["containers"][0]["args"])


def test_dashboards_are_configmaps_for_grafanas_sidecar():
    objs = by_kind(render(values_of("monitoring") | {"dashboards": {"labels": {"grafana_dashboard": "tandem"},
                                                                    "namespace": "monitoring"}}), "ConfigMap")
    files = {p.name: p.read_text() for p in (ROOT / "deploy" / "grafana").glob("*.json")}
    assert len(files) == len(objs) == 2
    for cm in objs:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "tandem"
        assert cm["metadata"]["namespace"] == "monitoring"
        ((name, text),) = cm["data"].items()
        assert json.loads(text) == json.loads(files[name])


def test_dashboards_keep_two_names_under_a_long_release_name():
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values={}, name="r" * 53, namespace="tandem-system", is_install=True)
    names = [obj["metadata"]["name"] for path, text in manifests.items() if "dashboards" in path
             for obj in yaml.safe_load_all(text) if obj]
    assert len(set(names)) == len(names) == 2 and all(len(n) <= 63 for n in names), names


def test_the_model_must_be_in_a_watched_namespace():
    """With watchNamespaces set, a model installed elsewhere would never be reconciled: the render fails."""
    values = values_of("model") | {"watchNamespaces": ["team-a"]}
    with pytest.raises(Exception, match="not among watchNamespaces"):
        render(values)
    values["model"]["namespace"] = "team-a"
    assert by_kind(render(values), "TandemModel")[0]["metadata"]["namespace"] == "team-a"


def test_servicemonitors_select_the_operators_pods_by_their_labels():
    objs = render(values_of("namespaced"))
    monitors = {m["metadata"]["name"]: m["spec"] for m in by_kind(objs, "ServiceMonitor")}
    assert sorted(monitors) == ["tandem-router", "tandem-workers"]
    components = {name: spec["selector"]["matchExpressions"][0]["values"] for name, spec in monitors.items()}
    assert components == {"tandem-router": ["router"], "tandem-workers": ["prefill", "decode", "kvstore"]}
    for spec in monitors.values():
        assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "tandem"}
        assert spec["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
        (endpoint,) = spec["endpoints"]
        targets = {r["targetLabel"]: r["sourceLabels"] for r in endpoint["relabelings"]}
        assert targets == {"model": ["__meta_kubernetes_pod_label_tandem_dev_model"],
                           "component": ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]}
    assert by_kind(render(values_of("monitoring")), "ServiceMonitor")[0]["spec"]["namespaceSelector"] == {"any": True}


def test_prometheusrule_is_the_rules_file():
    (rule,) = by_kind(render(values_of("monitoring")), "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "tandem-rules.yaml").read_text())
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_optional_model_and_notes():
    values = values_of("model")
    (model,) = by_kind(render(values), "TandemModel")
    assert model["metadata"]["namespace"] == "models" and model["spec"] == values["model"]["spec"]
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(values=values, name="tandem", namespace="tandem-system")["tandem/templates/NOTES.txt"]
    assert "kubectl -n models port-forward svc/smollm2-router 8000" in notes
    assert "http://smollm2-router.models.svc:8000/v1" in notes


@pytest.mark.parametrize("change", [
    {"prefill": {"replicas": -1}},
    {"decode": {"tensorParallelSize": "8"}},
    {"model": {"dtype": "int3"}},
    {"model": {"source": {"hf": "a/b", "pvc": {"claimName": "weights"}}}},  # exactly one source
    {"router": {"replica": 2}},  # a typo: unknown fields are refused
])
def test_tandemmodel_is_checked_against_the_crd(change):
    values = values_of("model")
    spec = values["model"]["spec"]
    for key, fields in change.items():
        spec[key] = spec.get(key, {}) | fields
    (model,) = by_kind(render(values), "TandemModel")
    with pytest.raises(jsonschema.ValidationError):
        validate(model)


@pytest.mark.parametrize("bad", [
    {"watchNamespaces": "team-a"},
    {"watchNamespaces": ["Team_A"]},
    {"image": {"pullPolicy": "Sometimes"}},
    {"operator": {"logLevel": "loud"}},
    {"operator": {"liveness": {"port": 70000}}},
    {"serviceMonitors": {"enabled": "yes"}},
    {"serviceMonitors": {"interval": "15"}},
    {"model": {"name": "Not A Name"}},
    {"model": {"name": "a-model-name-of-thirty-one-char"}},  # the CRD allows 30
    {"model": {"name": "7b-chat"}},  # its Services' names must start with a letter
    {"dashboards": {"labels": {"grafana_dashboard": 1}}},
    {"serviceMonitor": {"enabled": True}},  # a typo of serviceMonitors
])
def test_values_schema_rejects_bad_values(bad):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.render(values=bad, name="tandem", namespace="tandem-system")


def test_chart_copies_equal_their_sources():
    """deploy/ holds the canonical files; the chart holds copies because Helm reads only inside the chart:
    after editing one, `cp deploy/grafana/*.json helm/tandem/files/dashboards/`,
    `cp deploy/prometheus/tandem-rules.yaml helm/tandem/files/`, `cp deploy/crds/*.yaml helm/tandem/crds/`."""
    pairs = {ROOT / "deploy" / "grafana": CHART / "files" / "dashboards",
             ROOT / "deploy" / "prometheus": CHART / "files",
             CRD.parent: CHART / "crds"}
    for source, copy in pairs.items():
        for path in source.iterdir():
            if path.suffix in (".json", ".yaml"):
                assert (copy / path.name).read_bytes() == path.read_bytes(), f"{copy / path.name} differs from {path}"
    assert sorted(p.name for p in (CHART / "files" / "dashboards").iterdir()) == sorted(
        p.name for p in (ROOT / "deploy" / "grafana").glob("*.json"))


def test_crds_are_installed_and_valid():
    with helm.Chart.load(CHART) as chart:
        crds = [yaml.safe_load(c["data"]) for c in chart.crds]
    assert [c["spec"]["group"] + "/" + c["spec"]["names"]["kind"] for c in crds] == ["tandem.dev/TandemModel"]
    kubernetes_validate.validate(crds[0], "1.30", strict=True)
    assert crds[0] == yaml.safe_load(CRD.read_text())



def selects(selector: dict, labels: dict) -> bool:
    """A LabelSelector (matchLabels and In expressions) against an object's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    return all(e["operator"] == "In" and labels.get(e["key"]) in e["values"]
               for e in selector.get("matchExpressions", []))


CONTROLLER_LABELS = ("apps.kubernetes.io/", "leaderworkerset.sigs.k8s.io/")  # their controllers label the pods


def pod_templates(children: list[dict]) -> list[dict]:
    workloads = [c for c in children if c["kind"] in ("Deployment", "StatefulSet", "LeaderWorkerSet")]
    return [w["spec"]["leaderWorkerTemplate"]["workerTemplate"] if w["kind"] == "LeaderWorkerSet"
            else w["spec"]["template"] for w in workloads]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_servicemonitors_scrape_what_the_operator_builds(example):
    """The operator's own builders make a TandemModel's children: each ServiceMonitor finds the Services of
    its components, the named port is on them and on their pods, and the pods carry the labels relabeled."""
    from tandem.operator.build import build_children
    from tandem.operator.spec import TandemModel

    monitors = by_kind(render(values_of("monitoring")), "ServiceMonitor")
    body = yaml.safe_load(example.read_text())
    body["metadata"] |= {"namespace": body["metadata"].get("namespace", "models"), "uid": "0000"}
    for lws in (False, True):
        children = build_children(TandemModel.from_body(body, "tandem:test"), lws=lws)
        scraped = set()
        for monitor in monitors:
            (endpoint,) = monitor["spec"]["endpoints"]
            for svc in by_kind(children, "Service"):
                if not selects(monitor["spec"]["selector"], svc["metadata"]["labels"]):
                    continue
                assert endpoint["port"] in [p["name"] for p in svc["spec"]["ports"]], svc["metadata"]["name"]
                wanted = {k: v for k, v in svc["spec"]["selector"].items() if not k.startswith(CONTROLLER_LABELS)}
                backends = [t for t in pod_templates(children)
                            if selects({"matchLabels": wanted}, t["metadata"]["labels"])]
                assert backends, svc["metadata"]["name"]
                for pod in backends:
                    ports = {p["name"]: p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
                    assert ports[endpoint["port"]] == {"http": 8000, "metrics": 8080}[endpoint["port"]]
                    assert {"tandem.dev/model", "app.kubernetes.io/component"} <= set(pod["metadata"]["labels"])
                scraped.add(svc["metadata"]["labels"]["app.kubernetes.io/component"])
        kvstore = {"kvstore"} if body["spec"].get("kvStore", {}).get("enabled") else set()
        assert scraped == {"router", "prefill", "decode", *kvstore}, (example.name, lws)
