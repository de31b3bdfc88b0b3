"""`ngram` drafter: prompt/output lookup in the request's own tokens.

For the longest n in (max_n .. 1) whose last-n-token suffix occurred earlier,
propose the k tokens that followed its most recent earlier occurrence; n is the
proposal's `source` (a longer match is far likelier to be continued).

Per request it keeps, for each n, a dict n-gram -> end index (exclusive) of the
most recent occurrence, extended incrementally with the tokens committed since
the last call: O(new tokens x max_n) work per step, never O(context). Only
occurrences ending before the current end are indexed, so the suffix never
matches itself. Committed tokens only grow while a request runs; if the list
ever shrank the index is rebuilt.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engine.spec.base import Drafter, Proposal, register_drafter


@dataclass
class _Index:
    ends: list[dict[tuple[int, ...], int]]  # ends[n - 1][ngram] = end index of its last occurrence
    upto: int = 0  # occurrences ending at e <= upto are indexed


@register_drafter("ngram")
class NgramDrafter(Drafter):
    def __init__(self, max_n: int = 4, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError("ngram drafter needs 1 <= min_n <= max_n")
        self.max_n, self.min_n = max_n, min_n
        self._state: dict[str, _Index] = {}

    def propose(self, request_id: str, token_ids: Sequence[int], k: int) -> list[int]:
        return self.propose_tree(request_id, token_ids, k).drafts

    def propose_tree(self, request_id: str, token_ids: Sequence[int], k: int) -> Proposal:
        """A chain whose `source` is the match length n: the controller prices a draft
        after a 4-token match apart from one after a 1-token guess (engine/spec/acceptance.py)."""
        length = len(token_ids)
        if k <= 0 or length < 2:
            return Proposal([])
        index = self._index(request_id, token_ids)
        for n in range(min(self.max_n, length - 1), self.min_n - 1, -1):
            end = index.ends[n - 1].get(tuple(token_ids[length - n:]))
            if end is not None:
                return Proposal(list(token_ids[end:min(end + k, length)]), source=n)
        return Proposal([])

    def _index(self, request_id: str, token_ids: Sequence[int]) -> _Index:
        index = self._state.get(request_id)
        length = len(token_ids)
        if index is None or length - 1 < index.upto:  # new, or its tokens shrank
            index = _Index([{} for _ in range(self.max_n)])
            self._state[request_id] = index
        # Index occurrences ending at e in (upto, length - 1]: the suffix ending at `length` is excluded.
        for e in range(index.upto + 1, length):
            for n in range(1, min(self.max_n, e) + 1):
                index.ends[n - 1][tuple(token_ids[e - n:e])] = e
        index.upto = max(index.upto, length - 1)
        return index

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)
