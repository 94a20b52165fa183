"""Tandem: disaggregated prefill/decode LLM serving. `from tandem import LLM, SamplingParams`."""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's core logs connection churn at INFO otherwise
# No Tandem process uses gRPC across a fork (ranks and workers are spawned or exec'd), and gRPC's fork handlers
# (grpcio >= 1.80) can leave a poller on a closed epoll descriptor around subprocess.Popen: SIGABRT with
# "epoll_wait error: Bad file descriptor" (grpc/grpc#43055; seen twice as a worker dying at start-up in tests)
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _checkout_last_on_path() -> None:
    """A source checkout's top-level kernels/ and operator/ folders (installed as tandem.kernels and
    tandem.operator) shadow Hugging Face's `kernels`, which transformers >= 5.25 imports, and the
    standard library's operator, wherever the checkout is first on sys.path: `python -m tandem.cli`
    run from it, or pytest. There it goes last, where it shadows nothing."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        return  # an installed wheel: nothing of ours beside the package
    entries = [p for p in sys.path if os.path.abspath(p or ".") == root]
    if entries:
        sys.path[:] = [p for p in sys.path if p not in entries] + [root]


_checkout_last_on_path()

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "LoRARequest", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from tandem.engine.lora import LoRARequest
    from tandem.llm import LLM


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing tandem should not import transformers
        from tandem.llm import LLM
        return LLM
    if name == "LoRARequest":  # lazy: it imports torch
        from tandem.engine.lora import LoRARequest
        return LoRARequest
    raise AttributeError(name)
