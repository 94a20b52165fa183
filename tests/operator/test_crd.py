"""The TandemModel CRD: a valid Kubernetes object whose schema accepts the examples and rejects nonsense.
OpenAPI bounds and enums are checked with jsonschema, the CEL rules (x-kubernetes-validations) with
cel-python, as the API server would evaluate them; the spec model (pydantic) rejects the same."""
from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from pydantic import BaseModel, ValidationError

from tandem.operator.spec import TandemModelSpec
from tests.operator.conftest import SPECS, body_of, example_bodies, load_crd, model_of

try:
    import celpy  # cel-python: a dev dependency
except ImportError:  # the OpenAPI checks still run; the CEL test is skipped
    celpy = None


def strict(schema):
    """additionalProperties false where an object lists its properties: `kubectl apply --validate=strict`
    rejects unknown fields (the API server would prune them)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def openapi_schema() -> dict:
    (version,) = load_crd()["spec"]["versions"]
    schema = strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # the API server's own
    return schema


def cel_errors(obj, schema: dict) -> list[str]:
    """The messages of every CEL rule that `obj` breaks, walking the schema as the API server does."""
    errors = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if not env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(obj)}):
            errors.append(rule["message"])
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in schema.get("properties", {}):
                errors += cel_errors(value, schema["properties"][key])
    elif isinstance(obj, list) and "items" in schema:
        errors += [e for item in obj for e in cel_errors(item, schema["items"])]
    return errors


def crd_accepts(body: dict) -> list[str]:
    """[] if the API server would accept `body`, else why not."""
    try:
        jsonschema.validate(body, openapi_schema())
    except jsonschema.ValidationError as exc:
        return [exc.message]
    (version,) = load_crd()["spec"]["versions"]
    return cel_errors(body, version["schema"]["openAPIV3Schema"]) if celpy else []


def test_crd_is_a_valid_namespaced_v1alpha1_crd_with_status_and_columns():
    crd = load_crd()
    kubernetes_validate.validate(crd, "1.30", strict=True)
    assert crd["metadata"]["name"] == "tandemmodels.tandem.dev"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "tandem.dev", "Namespaced", "TandemModel", "tandemmodels")
    assert spec["names"]["shortNames"] == ["tm"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Ready"] == ".status.readyPools" and columns["Gateway"] == ".status.gatewayURL"
    assert columns["Age"] == ".metadata.creationTimestamp"


def test_examples_and_test_specs_are_accepted_by_the_crd_and_the_spec_model():
    bodies = example_bodies()
    assert {b["spec"].get("prefill", {}).get("pipelineParallelSize", 1) for b in bodies} == {1, 2}
    for body in [*bodies, *(body_of(spec) for spec in SPECS.values())]:
        assert crd_accepts(body) == [], body["metadata"]["name"]
        TandemModelSpec.model_validate(body["spec"])


NONSENSE = {
    "bad dtype": {"model": {"dtype": "int3"}},
    "TP of 0": {"decode": {"tensorParallelSize": 0}},
    "PP over 64": {"prefill": {"pipelineParallelSize": 65}},
    "negative replicas": {"decode": {"replicas": -1}},
    "two sources": {"model": {"source": {"hf": "a/b", "pvc": {"claimName": "c"}}}},
    "no source": {"model": {"source": {}}},
    "claim without name": {"model": {"source": {"pvc": {"path": "x"}}}},
    "tiny context": {"model": {"maxModelLen": 8}},
    "unknown field": {"decode": {"tensorParalelSize": 2}},
    "bad toleration": {"decode": {"tolerations": [{"operator": "Maybe"}]}},
    "bad quantity": {"kvStore": {"capacity": "lots"}},
    "milli-byte capacity": {"kvStore": {"capacity": "500m"}},  # a Kubernetes quantity, but not bytes
    "no disk capacity": {"kvStore": {"diskCapacity": 0}},
    "negative disk capacity": {"kvStore": {"diskCapacity": "-1Gi"}},
    "bounds without max": {"autoscaling": {"decode": {"minReplicas": 1}}},
    "adapter without path": {"model": {"source": {"pvc": {"claimName": "c"}}, "loraAdapters": [{"name": "sql"}]}},
    "adapter name with =": {"model": {"source": {"pvc": {"claimName": "c"}}, "loraAdapters": [{"name": "a=b", "path": "x"}]}},
}
# bounds that relate two fields: only CEL (and the spec model) can see them
CEL_NONSENSE = {
    "minReplicas over maxReplicas": ({"autoscaling": {"prefill": {"minReplicas": 5, "maxReplicas": 2}}},
                                     "minReplicas must not exceed maxReplicas"),
    "parallelism not a multiple of gpusPerPod": ({"decode": {"tensorParallelSize": 12, "gpusPerPod": 8}},
                                                 "tensorParallelSize x pipelineParallelSize must fit"),
    "path out of the claim": ({"model": {"source": {"pvc": {"claimName": "c", "path": "a/../../etc"}}}},
                              "path must stay inside the claim"),
    "adapter out of the claim": ({"model": {"source": {"pvc": {"claimName": "c"}},
                                            "loraAdapters": [{"name": "sql", "path": "../sql"}]}},
                                 "path must stay inside the claim"),
    "adapters without a claim": ({"model": {"source": {"hf": "a/b"}, "loraAdapters": [{"name": "sql", "path": "sql"}]}},
                                 "loraAdapters live on the model's claim"),
}


@pytest.mark.parametrize("case", NONSENSE)
def test_the_openapi_schema_and_the_spec_model_reject_nonsense(case):
    assert crd_accepts(body_of(NONSENSE[case]))
    with pytest.raises(ValidationError):
        TandemModelSpec.model_validate(NONSENSE[case])


@pytest.mark.parametrize("case", CEL_NONSENSE)
def test_cel_rules_and_the_spec_model_reject_related_fields(case):
    pytest.importorskip("celpy")
    spec, message = CEL_NONSENSE[case]
    errors = crd_accepts(body_of(spec))
    assert len(errors) == 1 and errors[0].startswith(message)
    with pytest.raises(ValidationError, match=message.split(" x ")[0]):
        TandemModelSpec.model_validate(spec)


def test_names_over_30_characters_are_rejected():
    pytest.importorskip("celpy")
    assert crd_accepts(body_of({}, name="m" * 31)) == ["a TandemModel's name has at most 30 characters"]
    with pytest.raises(ValidationError):
        model_of({}, name="m" * 31)


@pytest.mark.parametrize("name", ["7b-chat", "llama.v1"])
def test_names_its_services_cannot_take_are_rejected(name):
    """A Service's name is a DNS label starting with a letter: a model named otherwise would get half
    its children created and the rest refused, so the CRD and the operator refuse the name itself."""
    pytest.importorskip("celpy")
    assert crd_accepts(body_of({}, name=name)) == [
        "a TandemModel's name is lowercase letters, digits and '-', starting with a letter"]
    with pytest.raises(ValidationError):
        model_of({}, name=name)
    assert crd_accepts(body_of({}, name="llama-3-8b")) == []


def _fields(model: type[BaseModel]) -> dict:
    """The camelCase field tree of a spec model."""
    out = {}
    for name, field in model.model_fields.items():
        nested = [a for a in getattr(field.annotation, "__args__", (field.annotation,)) if isinstance(a, type)
                  and issubclass(a, BaseModel)]
        out[field.alias or name] = _fields(nested[0]) if nested else None
    return out


def _properties(schema: dict) -> dict | None:
    if schema.get("type") == "array":  # a list of objects: its items' fields
        return _properties(schema["items"])
    if "properties" not in schema:
        return None
    return {key: _properties(value) for key, value in schema["properties"].items()}


def test_the_spec_model_has_exactly_the_crd_fields():
    (version,) = load_crd()["spec"]["versions"]
    crd = _properties(version["schema"]["openAPIV3Schema"]["properties"]["spec"])
    ours = _fields(TandemModelSpec)
    # resources are free maps of quantities in both: compare down to them
    for pools in (crd, ours):
        for pool in ("router", "prefill", "decode", "kvStore"):
            pools[pool]["resources"] = None
            pools[pool]["tolerations"] = None
    assert ours == crd
