"""The router: its configuration (a ConfigMap mounted as /etc/tandem/router.yaml), its Deployment and
the Service that is the model's gateway."""
from __future__ import annotations

import yaml

from tandem.operator.common import (ROUTER_GRPC, ROUTER_HTTP, WORKER_GRPC, Obj, base_env, child_name,
                                    container, content_hash, http_probes, metadata, model_argument,
                                    model_volumes, pod_spec, port, resources, selector_labels, service_host,
                                    service_port)
from tandem.operator.spec import TandemModel

CONFIG_DIR = "/etc/tandem"


def router_config(model: TandemModel) -> dict:
    """The router's flags as its YAML file holds them (keys are flag names): workers are found through
    each pool's headless Service, which the router re-resolves, and by their own registration."""
    spec = model.spec
    config: dict = {f"{pool}_workers": f"{service_host(model, child_name(model, pool))}:{WORKER_GRPC}"
                    for pool in ("prefill", "decode")}
    source = spec.model.source
    served = spec.model.served_model_name or (source.hf if source and source.hf else None)
    if served is None and source is not None:  # a folder on a claim: clients say the TandemModel's name
        served = model.owner.name
    optional = {"served_model_name": served, "max_model_len": spec.model.max_model_len,
                "local_prefill_threshold": spec.router.local_prefill_threshold,
                "decode_scorers": spec.router.decode_scorers, "prefill_scorers": spec.router.prefill_scorers}
    config.update({key: value for key, value in optional.items() if value is not None})
    return config


def slo_config(model: TandemModel) -> dict:
    slo = model.spec.slo
    return {key: value for key, value in (("ttft_millis", slo.ttft_millis), ("itl_millis", slo.itl_millis))
            if value is not None}


def config_map(model: TandemModel) -> Obj:
    data = {"router.yaml": yaml.safe_dump(router_config(model), sort_keys=True)}
    if slo := slo_config(model):  # the SLO targets, for tools that read them (the router does not)
        data["slo.yaml"] = yaml.safe_dump(slo, sort_keys=True)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": metadata(model, child_name(model, "router-config"), "router"), "data": data}


def deployment(model: TandemModel, config: Obj) -> Obj:
    spec = model.spec.router
    args = ["router", *model_argument(model), "--port", str(ROUTER_HTTP), "--grpc-port", str(ROUTER_GRPC),
            "--config", f"{CONFIG_DIR}/router.yaml", *spec.extra_args]
    volumes, mounts = model_volumes(model)
    volumes = [*volumes, {"name": "config", "configMap": {"name": config["metadata"]["name"],
                                                          "items": [{"key": "router.yaml", "path": "router.yaml"}]}}]
    mounts = [*mounts, {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}]
    main = container(model, "router", args, [port("http", ROUTER_HTTP), port("grpc", ROUTER_GRPC)],
                     base_env(model), resources(spec), http_probes("http", startup_seconds=600, live_path="/version"), mounts)
    meta = metadata(model, child_name(model, "router"), "router")
    # a new configuration rolls the routers: they read the file once, at start
    template = {"metadata": {"labels": meta["labels"],
                             "annotations": {"tandem.dev/config-hash": content_hash(config["data"])}},
                "spec": pod_spec(spec, main, volumes, grace_seconds=30)}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
            "spec": {"replicas": model.spec.replicas("router"),
                     "selector": {"matchLabels": selector_labels(model, "router")}, "template": template}}


def service(model: TandemModel) -> Obj:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(model, child_name(model, "router"), "router"),
            "spec": {"type": "ClusterIP", "selector": selector_labels(model, "router"),
                     "ports": [service_port("http", ROUTER_HTTP), service_port("grpc", ROUTER_GRPC)]}}


def build(model: TandemModel) -> list[Obj]:
    config = config_map(model)
    return [config, deployment(model, config), service(model)]
