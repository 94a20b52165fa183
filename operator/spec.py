"""The TandemModel spec as pydantic models: the defaults live here (the CRD has none), and the rules
that relate two fields are checked again here, since only an API server evaluates the CRD's CEL."""
from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP, VERSION, PLURAL, KIND = "tandem.dev", "v1alpha1", "tandemmodels", "TandemModel"
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
Quantity = int | Annotated[str, Field(pattern=QUANTITY)]
# a byte count the KV store's --capacity-bytes takes: no sign, exponent or milli, never zero
BYTES = r"^[0-9]*[1-9][0-9]*(\.[0-9]+)?(k|[KMGTPE]i|[MGTPE])?$"
ByteQuantity = Annotated[int, Field(ge=1)] | Annotated[str, Field(pattern=BYTES)]


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class PVCSource(_Camel):
    claim_name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    path: str = Field("", pattern=r"^[A-Za-z0-9._/-]*$")

    @model_validator(mode="after")
    def _inside_the_claim(self) -> PVCSource:
        if ".." in self.path.split("/"):
            raise ValueError("path must stay inside the claim (no '..')")
        return self


class ModelSource(_Camel):
    hf: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
    pvc: PVCSource | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.hf is None) == (self.pvc is None):
            raise ValueError("model.source needs exactly one of hf or pvc")
        return self


class LoRAAdapterSpec(_Camel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)  # the model name clients use
    path: str = Field(pattern=r"^[A-Za-z0-9._/-]+$", max_length=1024)  # its PEFT folder inside the model's claim

    @model_validator(mode="after")
    def _inside_the_claim(self) -> LoRAAdapterSpec:
        if ".." in self.path.split("/"):
            raise ValueError("path must stay inside the claim (no '..')")
        return self


class ModelSpec(_Camel):
    source: ModelSource | None = None  # None: the image's embedded SmolLM2-135M-Instruct
    served_model_name: str | None = Field(None, pattern=r"^\S+$")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int | None = Field(None, ge=16, le=1048576)
    lora_adapters: list[LoRAAdapterSpec] = Field([], max_length=64)  # every prefill and decode worker serves them

    @model_validator(mode="after")
    def _adapters_on_the_claim(self) -> ModelSpec:
        if self.lora_adapters and (self.source is None or self.source.pvc is None):
            raise ValueError("loraAdapters live on the model's claim: they need source.pvc")
        if len({a.name for a in self.lora_adapters}) < len(self.lora_adapters):
            raise ValueError("loraAdapters names must be unique")
        return self


class Toleration(_Camel):
    key: str | None = None
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class Resources(_Camel):
    limits: dict[str, Quantity] = {}
    requests: dict[str, Quantity] = {}


class Placement(_Camel):
    """Where and with what a pool's pods run."""
    resources: Resources = Resources()
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []


class RouterSpec(Placement):
    replicas: int = Field(1, ge=1, le=64)
    local_prefill_threshold: int | None = Field(None, ge=0, le=1048576)
    decode_scorers: str | None = None
    prefill_scorers: str | None = None
    extra_args: list[str] = []


class PoolSpec(Placement):
    replicas: int = Field(1, ge=0, le=512)
    tensor_parallel_size: int = Field(1, ge=1, le=64)
    pipeline_parallel_size: int = Field(1, ge=1, le=64)
    gpus_per_pod: int = Field(0, ge=0, le=16)
    extra_args: list[str] = []

    @model_validator(mode="after")
    def _parallelism_fits_pods(self) -> PoolSpec:
        if self.gpus_per_pod and self.world_size > self.gpus_per_pod and self.world_size % self.gpus_per_pod:
            raise ValueError("tensorParallelSize x pipelineParallelSize must fit in one pod or be a multiple "
                             "of gpusPerPod")
        return self

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def pods_per_replica(self) -> int:
        """Pods of one serving replica: more than one makes it a leader/worker group."""
        return math.ceil(self.world_size / self.gpus_per_pod) if self.gpus_per_pod else 1


class KVStoreSpec(Placement):
    enabled: bool = False
    replicas: int = Field(1, ge=1, le=64)  # each holds its share of the blocks (kvstore/replicas.py)
    capacity: ByteQuantity = "16Gi"  # the DRAM tier of each replica
    disk_capacity: ByteQuantity | None = None  # a disk tier (an emptyDir) of this size; None: none


class SLOSpec(_Camel):
    ttft_millis: int | None = Field(None, ge=1, le=600000)
    itl_millis: int | None = Field(None, ge=1, le=60000)


class Bounds(_Camel):
    min_replicas: int = Field(ge=0, le=512)
    max_replicas: int = Field(ge=1, le=512)

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


class AutoscalingSpec(_Camel):
    router: Bounds | None = None
    prefill: Bounds | None = None
    decode: Bounds | None = None


class TandemModelSpec(_Camel):
    model: ModelSpec = ModelSpec()
    image: str | None = None  # None: the operator's own image
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    router: RouterSpec = RouterSpec()
    prefill: PoolSpec = PoolSpec()
    decode: PoolSpec = PoolSpec()
    kv_store: KVStoreSpec = KVStoreSpec()
    slo: SLOSpec = SLOSpec()
    autoscaling: AutoscalingSpec = AutoscalingSpec()

    def replicas(self, pool: Literal["router", "prefill", "decode"]) -> int:
        """The pool's replicas, kept within its autoscaling bounds."""
        bounds: Bounds | None = getattr(self.autoscaling, pool)
        wanted: int = getattr(self, pool).replicas
        return bounds.clamp(wanted) if bounds else wanted


class Owner(BaseModel):
    """The TandemModel object the children belong to."""
    model_config = ConfigDict(frozen=True)
    # its children's names start with it, and a Service's name is a DNS label that starts with a letter
    name: str = Field(max_length=30, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    namespace: str
    uid: str


class TandemModel(BaseModel):
    """What the builders need from a TandemModel: who owns the children, the spec and the image to use."""
    model_config = ConfigDict(frozen=True)
    owner: Owner
    spec: TandemModelSpec
    default_image: str

    @classmethod
    def from_body(cls, body: dict, default_image: str) -> TandemModel:
        meta = body["metadata"]
        return cls(owner=Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
                   spec=TandemModelSpec.model_validate(body.get("spec") or {}), default_image=default_image)

    @property
    def image(self) -> str:
        return self.spec.image or self.default_image
