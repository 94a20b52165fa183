"""Stored responses for the Responses API: `store`, `previous_response_id`, GET and DELETE by id.

Each stored response keeps its own input items, the response object (its output items included) and the id of
the response it continued, so a conversation of n turns costs n turns' items, not n^2. A follow-up's history is
the chain walked back to its start: every ancestor's input items, then its output items. The store holds at most
`capacity` responses, least recently used out first; a follow-up whose chain lost a link is refused with 404,
as is an unknown id (the same words as OpenAI's). Responses live in the serving process's memory: a restart
forgets them, and gateways behind one Service each keep their own.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from tandem.server.errors import APIError


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    previous_id: str | None


def not_found(response_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param=param)


class ResponseStore:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()  # the API's handlers and its stream generators both reach it

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def put(self, response: dict[str, Any], input_items: list[dict[str, Any]], previous_id: str | None) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._items[response["id"]] = Stored(response, input_items, previous_id)
            self._items.move_to_end(response["id"])
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> dict[str, Any]:
        with self._lock:
            stored = self._items.get(response_id)
            if stored is None:
                raise not_found(response_id)
            self._items.move_to_end(response_id)
            return stored.response

    def delete(self, response_id: str) -> None:
        with self._lock:
            if self._items.pop(response_id, None) is None:
                raise not_found(response_id)

    def history(self, response_id: str) -> list[dict[str, Any]]:
        """The conversation up to and including a response: each turn's input items, then its output."""
        turns: list[Stored] = []
        with self._lock:
            link: str | None = response_id
            while link is not None:
                stored = self._items.get(link)
                if stored is None:  # the start of the chain or a lost link: either way the follow-up can't go on
                    raise not_found(link, "previous_response_id")
                self._items.move_to_end(link)  # a live conversation keeps its whole chain
                turns.append(stored)
                link = stored.previous_id
        items: list[dict[str, Any]] = []
        for stored in reversed(turns):
            items += stored.input_items
            items += stored.response["output"]
        return items
