"""Tandem: disaggregated prefill/decode LLM serving. `from tandem import LLM, SamplingParams`."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # gRPC's core logs connection churn at INFO otherwise

from tandem.outputs import CompletionOutput, RequestOutput
from tandem.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from tandem.llm import LLM


def __getattr__(name: str):
    if name == "LLM":  # lazy: importing tandem should not import transformers
        from tandem.llm import LLM
        return LLM
    raise AttributeError(name)
