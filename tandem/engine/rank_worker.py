"""A worker rank of a parallel group (parallel_group.py): its process's whole life. It joins the group, loads
its share of the model (its stage's layers, its shard of them), then runs rank 0's commands in order: set-up
(runner, pack, profile, compile), forward passes, block copies, LoRA adapter sets, and its part of KV reads
and writes (group_caches.py)."""
from __future__ import annotations

import logging
import signal
import traceback
from functools import partial

import torch
import torch.distributed as dist

from tandem.engine.kv_transfer import codec
from tandem.engine.parallel_group import TIMEOUT, Links, rank_device
from tandem.engine.pipeline import Pipeline, Placement

log = logging.getLogger("tandem.parallel")


def serve_rank(config, model_path: str, hf_config: dict, max_model_len: int, device: torch.device,
               dtype: torch.dtype, placement: Placement, store_port: int, threads: int, pipe) -> None:
    from tandem.engine import loader
    from tandem.engine.lora import LoRALayers, load_adapter
    from tandem.engine.model_runner import ModelRunner
    from tandem.engine.models import model_class
    from tandem.engine.sharding import shard_lora

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 stops us
    torch.set_num_threads(threads)
    rank = placement.rank
    device = rank_device(device, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.TCPStore("127.0.0.1", store_port, placement.tp * placement.pp, False, timeout=TIMEOUT)
    links = Links(store, placement, device)
    pipeline = Pipeline(placement, links, hf_config["num_hidden_layers"]) if placement.pp > 1 else None
    runner: ModelRunner | None = None
    adapters = {}  # name -> this rank's share of a LoRA adapter
    try:
        model = loader.build_model(model_class(hf_config), hf_config, model_path, max_model_len, device, dtype,
                                   config.load_format, placement.shard, links.all_reduce,
                                   pipeline.layers if pipeline else None)
        pipe.send(("ok", None))
        while True:
            try:
                command, args, reply = pipe.recv()
            except (EOFError, OSError):
                return  # rank 0 is gone
            if command == "stop":
                return
            answer = None
            with torch.inference_mode():
                if command == "runner":
                    runner = ModelRunner(model, *args, dtype, device, pipeline)
                elif command == "pack":
                    model.pack_weights()
                elif command == "profile":
                    ModelRunner.profile_activations(model, *args, dtype, device, pipeline)
                elif command == "loras":  # rank 0's _set_loras: its adapters, in its order (a step names them by index)
                    cut = partial(shard_lora, config=hf_config, shard=placement.shard) if placement.shard else None
                    adapters = {name: adapters.get(name) or load_adapter(
                        name, path, model.shape, dtype, device, config.max_lora_rank, cut) for name, path in args[0]}
                    layers = LoRALayers(model, list(adapters.values()))  # also detaches the ones dropped
                    runner.loras = layers if adapters else None
                elif command == "kv_read":  # GroupCaches.encode: this rank's heads of the layers it holds
                    layers, slots = args
                    mine = [runner.kv_caches[i] for i in runner.kv_layers if i in layers]
                    answer = bytes(codec.encode(mine, torch.from_numpy(slots))) if mine else b""
                elif command == "kv_write":  # GroupCaches.decode_into: this rank's share
                    layer, slots, data = args
                    codec.decode_into(runner.kv_caches[layer], torch.from_numpy(slots), data)
                else:  # forward, copy, compile: the runner's own methods, as rank 0 runs them
                    getattr(runner, {"forward": "forward_eager", "copy": "_copy_blocks",
                                     "compile": "compile_prompt_kernels"}[command])(*args)
            if reply:
                pipe.send(("ok", answer))
    except BaseException as exc:  # noqa: BLE001 - rank 0 must hear why, then this rank is gone
        log.error("rank %d of the parallel group failed:\n%s", rank, traceback.format_exc())
        try:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            pass
        raise SystemExit(1) from None
