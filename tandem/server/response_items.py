"""The Responses API's output items and finished response object (serving_responses.py builds them)."""
from __future__ import annotations

import secrets
from typing import Any

from tandem.outputs import RequestOutput


def item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(msg_id: str, text: str | None, status: str) -> dict[str, Any]:
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
            "content": [] if text is None else [text_part(text)]}


def call_item(call: dict[str, Any], status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id("fc"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def finished(shell: dict[str, Any], final: RequestOutput, items: list[dict[str, Any]],
             reasoning_tokens: int = 0) -> dict[str, Any]:
    o = final.outputs[0]
    prompt, completion = len(final.prompt_token_ids), len(o.token_ids)
    cut = o.finish_reason == "length"
    if cut:  # the message that was cut off is incomplete too, as is reasoning cut before it closed (nothing after)
        items = [{**item, "status": "incomplete"} if item["type"] == "message" or (
            item["type"] == "reasoning" and i == len(items) - 1) else item for i, item in enumerate(items)]
    return {**shell, "status": "incomplete" if cut else "completed", "output": items,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "usage": {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": final.num_cached_tokens,
                                                                  "cache_write_tokens": 0},
                      "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                      "total_tokens": prompt + completion}}


def reasoning_part(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(rs_id: str, text: str | None, status: str) -> dict[str, Any]:
    """A reply's <think> part as OpenAI's reasoning item: its text as content, no summary."""
    return {"type": "reasoning", "id": rs_id, "summary": [], "status": status,
            "content": [] if text is None else [reasoning_part(text)]}
