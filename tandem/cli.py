"""`tandem` command line. Subcommands grow with the product; `tandem --help` lists them."""
from __future__ import annotations

import argparse
import io
import sys


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--num-gpu-blocks-override", type=int, default=None, help="KV blocks, instead of sizing")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse KV blocks of shared prompt prefixes (default: on)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="most requests in one batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    p.add_argument("--kv-cache-gib", type=float, default=4.0,
                   help="KV cache size in GiB on CPU when --num-gpu-blocks-override is not given (default: 4)")
    p.add_argument("--device", default="auto", help="auto (CUDA where there is a GPU), cuda or cpu")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of GPU memory for weights, activations and KV cache (default: 0.9)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no decode CUDA graphs")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split each layer over this many GPUs (on CPUs, processes) (default: 1)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages, each of --tensor-parallel-size ranks (default: 1)")
    p.add_argument("--num-scheduler-steps", type=int, default=1,
                   help="CUDA: greedy decode steps per host round trip when a step is plain decode (default: 1, "
                        "every step returns to the host: streams stay smooth; 8 for throughput, as LLM uses)")


def _engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
                num_gpu_blocks_override=args.num_gpu_blocks_override,
                enable_prefix_caching=args.enable_prefix_caching, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, cpu_kv_cache_gib=args.kv_cache_gib,
                device=args.device, gpu_memory_utilization=args.gpu_memory_utilization,
                enforce_eager=args.enforce_eager, num_scheduler_steps=args.num_scheduler_steps,
                tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size)


def _sampling(args: argparse.Namespace):
    from tandem import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                          seed=args.seed)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)


def cmd_generate(args: argparse.Namespace) -> int:
    from tandem import LLM

    llm = LLM(**_engine_kwargs(args))
    # undecodable bytes become U+FFFD, as a text editor shows them (a lone surrogate would reach the tokenizer)
    stdin = io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors="replace") if args.prompt is None else []
    prompts = args.prompt or [line.rstrip("\n") for line in stdin if line.strip()]
    for out in llm.generate(prompts, _sampling(args)):
        print(out.outputs[0].text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tandem import LLM

    llm = LLM(**_engine_kwargs(args))
    history: list[dict] = []
    print("Tandem chat on the local engine. Empty line or Ctrl-D to quit.", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        history.append({"role": "user", "content": line})
        text = llm.chat(history, _sampling(args), use_tqdm=False)[0].outputs[0].text
        history.append({"role": "assistant", "content": text})
        print(text, flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem: disaggregated prefill/decode LLM serving.")
    parser.add_argument("--version", action="version", version=f"tandem {__import__('tandem').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    gen = sub.add_parser("generate", help="generate completions for prompts (arguments or stdin lines)",
                         description="Offline batch generation on the local engine.")
    _add_engine_args(gen)
    _add_sampling_args(gen)
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable); default: one per stdin line")
    gen.set_defaults(func=cmd_generate)
    chat = sub.add_parser("chat", help="chat with a model in the terminal",
                          description="Interactive chat on the local engine with the model's chat template.")
    _add_engine_args(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=cmd_chat)
    from tandem.kvstore.main import add_kvstore_parser  # light: the store is imported when the command runs
    from tandem.launcher import add_up_parser
    from tandem.operator.main import add_operator_parser  # light: kopf is imported when the command runs
    from tandem.router.main import add_router_parser  # light: heavy imports wait for the command
    from tandem.server.launch import add_serve_parser
    from tandem.worker.process import add_worker_parsers

    add_serve_parser(sub)
    add_router_parser(sub)
    add_worker_parsers(sub)
    add_up_parser(sub)
    add_operator_parser(sub)
    add_kvstore_parser(sub)
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):  # file values become defaults, so the command line still wins
        from tandem.server.launch import apply_config_file

        apply_config_file(args.config_parser, args.config)
        args = parser.parse_args(argv)
    return parser, args


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # bad input or a missing model: one line, not a traceback
        print(f"tandem {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
