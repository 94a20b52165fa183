"""Engine configuration: one dataclass a concern, gathered in EngineConfig."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype, default: torch.dtype = torch.float32) -> torch.dtype:
    """'auto', a name or a torch.dtype to a torch.dtype; unknown names are a ValueError."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[dtype]


def resolve_device(device: str) -> torch.device:
    """'auto' is the GPU where there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(hf_config: dict, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPUs (exact, and fast there); on GPUs the checkpoint's 16-bit type, else bfloat16."""
    if device.type == "cpu":
        return torch.float32
    name = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name, torch.bfloat16)


@dataclass
class CacheConfig:
    block_size: int = 16
    num_gpu_blocks: int | None = None  # overrides the memory fraction when set
    gpu_memory_utilization: float = 0.9  # fraction of (free) device memory, or of host RAM on CPU
    cpu_kv_cache_gib: float = 4.0  # KV budget on CPU when no block count is given
    enable_prefix_caching: bool = True
    hash_seed: str = "tandem"

    def __post_init__(self) -> None:
        if self.block_size < 1 or (self.num_gpu_blocks is not None and self.num_gpu_blocks < 1):
            raise ValueError(f"block_size and num_gpu_blocks must be >= 1, got {self.block_size} and "
                             f"{self.num_gpu_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1 or not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1] and cpu_kv_cache_gib > 0, got "
                             f"{self.gpu_memory_utilization} and {self.cpu_kv_cache_gib}")


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    policy: str = "fcfs"  # or "priority", or "lof" (offline batches: pacing.py)
    enable_chunked_prefill: bool = True
    num_scheduler_steps: int = 8  # greedy decode steps per host round trip where they qualify (multi_step.py; CUDA)
    max_loras: int | None = None  # most LoRA adapters the running requests use at once (vLLM's); None: no limit

    def __post_init__(self) -> None:
        if self.policy not in ("fcfs", "priority", "lof"):
            raise ValueError(f"policy must be 'fcfs', 'priority' or 'lof', got {self.policy!r}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.num_scheduler_steps < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and num_scheduler_steps must be >= 1")
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 (or None: no limit), got {self.max_loras}")


@dataclass
class GroupConfig:
    """A parallel group spread over `size` hosts (pods), the operator's leader/worker group: host `index` runs
    ranks [index * k, (index + 1) * k) of the tp x pp ranks (k = tp x pp / size); host 0, the leader at
    `leader`, runs the engine (rank 0), the group's store on `port` and its command listener on `port` + 1."""
    size: int = 1
    index: int = 0
    leader: str = "127.0.0.1"
    port: int = 29500

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.index < self.size or not 0 < self.port < 65535:
            raise ValueError(f"a group needs size >= 1, 0 <= index < size and a port in 1..65534; got size "
                             f"{self.size}, index {self.index}, port {self.port}")


@dataclass
class EngineConfig:
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer: str | None = None
    dtype: str | torch.dtype = "auto"
    device: str = "auto"  # "auto": CUDA where there is a GPU, else the CPU
    enforce_eager: bool = False  # CUDA: no decode graphs
    load_format: str = "auto"  # "dummy": random weights from config.json alone (benchmarks), as in vLLM
    skip_tokenizer_init: bool = False  # token ids in and out, no tokenizer (as in vLLM)
    max_model_len: int | None = None
    seed: int = 0
    generation_config: str = "auto"  # "auto": the model's generation_config.json; "vllm"/"none": ignore
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    kv_role: str | None = None  # None: colocated; "producer": prefill worker; "consumer": decode worker
    lora_modules: dict[str, str] = field(default_factory=dict)  # LoRA adapter name -> PEFT folder (lora.py)
    max_lora_rank: int = 64
    tensor_parallel_size: int = 1  # ranks, each with its share of heads and MLP (sharding.py): GPUs, or CPU processes
    pipeline_parallel_size: int = 1  # stages, each with its run of layers (pipeline.py), of tensor_parallel_size ranks
    group: GroupConfig = field(default_factory=GroupConfig)  # the hosts those ranks run on (one, by default)

    @classmethod
    def from_args(cls, args, **overrides) -> "EngineConfig":
        """From the engine flags every command shares (tandem.cli's `_add_engine_args`)."""
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return cls(
            model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, seed=get("seed", 0),
            device=get("device", "auto"), enforce_eager=get("enforce_eager", False),
            generation_config=get("generation_config", "auto"),
            lora_modules=dict(get("lora_modules") or {}), max_lora_rank=get("max_lora_rank", 64),
            tensor_parallel_size=get("tensor_parallel_size", 1), pipeline_parallel_size=get("pipeline_parallel_size", 1),
            group=get("group") or GroupConfig(),
            cache=CacheConfig(block_size=args.block_size, num_gpu_blocks=args.num_gpu_blocks_override,
                              gpu_memory_utilization=get("gpu_memory_utilization", 0.9),
                              enable_prefix_caching=args.enable_prefix_caching, cpu_kv_cache_gib=args.kv_cache_gib),
            scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                                      policy=get("scheduling_policy", "fcfs"),
                                      num_scheduler_steps=get("num_scheduler_steps", 1), max_loras=get("max_loras")),
            **overrides)

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1 (or None: the model's own), got {self.max_model_len}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size and pipeline_parallel_size must be >= 1, got "
                             f"{self.tensor_parallel_size} and {self.pipeline_parallel_size}")
        if (self.tensor_parallel_size * self.pipeline_parallel_size) % self.group.size:
            raise ValueError(f"tensor_parallel_size x pipeline_parallel_size = "
                             f"{self.tensor_parallel_size * self.pipeline_parallel_size} ranks do not split evenly "
                             f"over a group of {self.group.size} hosts")
        if self.kv_role not in (None, "producer", "consumer"):
            raise ValueError(f"kv_role must be None, 'producer' or 'consumer', got {self.kv_role!r}")
