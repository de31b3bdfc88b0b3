"""WaitingQueue: requests ordered by (priority, arrival), FCFS within a priority.

A binary heap: push and pop are O(log n); removal (abort of a waiting
request) is lazy, O(1): the entry is emptied and skipped when it surfaces.
Equal keys (n > 1 siblings share an arrival time) keep insertion order.
Pure Python, no torch.
"""
from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator

from engine.request import Request


class WaitingQueue:
    def __init__(self) -> None:
        # Entries are [priority, arrival, seq, request-or-None]; None marks a removed entry.
        self._heap: list[list] = []
        self._entries: dict[Request, list] = {}
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, req: object) -> bool:
        return req in self._entries

    def __iter__(self) -> Iterator[Request]:
        """Live requests in service order (O(n log n); for stats and tests)."""
        return iter([e[3] for e in sorted(self._entries.values())])

    def first(self, n: int) -> list[Request]:
        """The first n live requests in service order (O(len log n))."""
        return [e[3] for e in heapq.nsmallest(n, self._entries.values())] if n > 0 else []

    def push(self, req: Request) -> None:
        if req in self._entries:
            raise ValueError(f"request {req.request_id} is already waiting")
        entry = [req.priority, req.arrival_time, next(self._seq), req]
        self._entries[req] = entry
        heapq.heappush(self._heap, entry)

    def peek(self) -> Request | None:
        self._drop_removed()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        self._drop_removed()
        entry = heapq.heappop(self._heap)
        del self._entries[entry[3]]
        return entry[3]

    def remove(self, req: Request) -> bool:
        entry = self._entries.pop(req, None)
        if entry is None:
            return False
        entry[3] = None
        return True

    def _drop_removed(self) -> None:
        heap = self._heap
        while heap and heap[0][3] is None:
            heapq.heappop(heap)
