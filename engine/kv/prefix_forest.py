"""Shared-prefix forest over the requests' registered blocks, maintained incrementally.

A trie whose nodes are (parent node, physical block id): request r's path is its
registered leading blocks (prefix-cache hits at admission, then each block as it
becomes full and computed), in table order. Two requests holding the same physical
block under the same parent share that block and every block before it, so the
nodes with >= 2 members form the forest of shared prefixes. Blocks enter a path one
at a time (O(1) each) and leave when the request is freed; the forest's levels are
recomputed only when a node with >= 2 members changed (`version`), by a walk over
those nodes alone, not over every block of every request.

A level is a maximal run of nodes with the same member set: its blocks are
`block_ids[start:]`, the `start` blocks before it belong to its parent level.
Pure Python: no torch.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class SharedPrefix:
    """Leading blocks shared (same physical ids) by two or more requests; its own
    level is block_ids[start:] (the blocks before belong to its parent level)."""
    block_ids: tuple[int, ...]
    request_ids: tuple[str, ...]
    start: int = 0


class _Node:
    __slots__ = ("block_id", "parent", "children", "members")

    def __init__(self, block_id: int, parent: "_Node | None"):
        self.block_id = block_id
        self.parent = parent
        self.children: dict[int, _Node] = {}
        self.members: set[str] = set()


class PrefixForest:
    def __init__(self):
        self.root = _Node(-1, None)
        self.paths: dict[str, list[_Node]] = {}
        self.version = 0  # bumped whenever a node with >= 2 members changes
        self._levels: tuple[SharedPrefix, ...] = ()
        self._levels_version = 0

    def extend(self, request_id: str, block_ids: Iterable[int]) -> None:
        """Append blocks to the request's path (the next registered blocks of its table)."""
        path = self.paths.setdefault(request_id, [])
        node = path[-1] if path else self.root
        for block_id in block_ids:
            child = node.children.get(block_id)
            if child is None:
                child = node.children[block_id] = _Node(block_id, node)
            child.members.add(request_id)
            if len(child.members) >= 2:
                self.version += 1
            path.append(child)
            node = child

    def remove(self, request_id: str) -> None:
        """Forget the request's path (it was freed or preempted)."""
        for node in reversed(self.paths.pop(request_id, [])):
            if len(node.members) >= 2:
                self.version += 1
            node.members.discard(request_id)
            if not node.members:
                del node.parent.children[node.block_id]

    def path_length(self, request_id: str) -> int:
        return len(self.paths.get(request_id, ()))

    def levels(self) -> tuple[SharedPrefix, ...]:
        """Every shared level, parents before their children (cached per version)."""
        if self._levels_version != self.version:
            out: list[SharedPrefix] = []
            for child in self.root.children.values():
                self._walk(child, (), out)
            self._levels, self._levels_version = tuple(out), self.version
        return self._levels

    def _walk(self, node: _Node, before: tuple[int, ...], out: list[SharedPrefix]) -> None:
        if len(node.members) < 2:
            return
        run = [node.block_id]
        # Children's member sets are disjoint subsets of the parent's: a child with as
        # many members has all of them and is the parent's only child.
        while len(node.children) == 1:
            (child,) = node.children.values()
            if len(child.members) != len(node.members):
                break
            node = child
            run.append(node.block_id)
        blocks = before + tuple(run)
        out.append(SharedPrefix(blocks, tuple(sorted(node.members)), len(before)))
        for child in node.children.values():
            self._walk(child, blocks, out)


def restrict(levels: Iterable[SharedPrefix], request_ids: list[str]) -> list[SharedPrefix]:
    """The levels (parents first) as seen by a subset of requests, members in the given
    order: a level with < 2 of them is dropped (its blocks join its children's levels),
    and a level with the same members as its kept parent merges into it."""
    order = {rid: i for i, rid in enumerate(request_ids)}
    out: list[SharedPrefix] = []
    # A level's blocks -> (where its children's levels start, index in out of the
    # nearest kept level at or above it, or None).
    anchor: dict[tuple[int, ...], tuple[int, int | None]] = {}
    for level in levels:
        start, parent = anchor.get(level.block_ids[:level.start], (0, None))
        members = tuple(sorted((r for r in level.request_ids if r in order), key=order.__getitem__))
        if len(members) < 2:
            anchor[level.block_ids] = (start, parent)
            continue
        if parent is not None and out[parent].request_ids == members:
            out[parent] = SharedPrefix(level.block_ids, members, out[parent].start)
        else:
            out.append(SharedPrefix(level.block_ids, members, start))
            parent = len(out) - 1
        anchor[level.block_ids] = (len(level.block_ids), parent)
    return out
