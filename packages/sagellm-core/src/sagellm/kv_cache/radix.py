"""A radix tree over cached KV blocks: the longest cached prefix of a prompt, to the token.

Each node is one full block: its edge label is the block's tokens, and it is found from its
parent either by key (``sagellm.kv_cache.block_hash``; the tokens are compared as well, so a key
collision can never hand out another prompt's KV) or, where the next block differs, through the
children that start with the same token, which gives how far into a cached block a prompt still
matches. Each salt has its own root, so requests with different salts share no node.

A node may be *hollow* (``block == NO_BLOCK``): its KV was given back but the node stays, so
that the blocks below it are still reached from the root. Only a sliding-window model makes
them (``BlockManager._evict``): its queries read just the last blocks of a match, so a chain
whose early blocks are gone is still worth reusing. A hollow node is filled again when a
sequence recomputes that block, and removed once nothing is below it.

The index keeps no reference counts and frees nothing: the block manager owns both.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from sagellm.kv_cache.block_hash import block_key
from sagellm.protocols import NO_BLOCK


@dataclass(eq=False)
class RadixNode:
    """One cached block (``block == NO_BLOCK``: hollow, see the module doc), or the root of
    one salt (no parent)."""

    key: bytes
    tokens: tuple[int, ...]
    block: int
    parent: RadixNode | None
    #: Children by their first token (a list: blocks may share it).
    children: dict[int, list[RadixNode]] = field(default_factory=dict)

    @property
    def is_hollow(self) -> bool:
        return self.block == NO_BLOCK and self.parent is not None

    @property
    def num_children(self) -> int:
        return sum(len(c) for c in self.children.values())

    def walk(self) -> Iterator[RadixNode]:
        """This node and its descendants, parents first."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            for kids in node.children.values():
                stack.extend(kids)


@dataclass(frozen=True)
class PrefixMatch:
    """What :meth:`RadixIndex.match` found: whole cached blocks, then a partly matching one."""

    nodes: list[RadixNode]
    #: Tokens of the next cached block that the prompt starts with (0 .. block_size - 1).
    num_partial_tokens: int = 0

    @property
    def blocks(self) -> list[int]:
        return [n.block for n in self.nodes]


class RadixIndex:
    """Cached blocks by key and by position in the tree of prefixes."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._roots: dict[bytes, RadixNode] = {}
        self._nodes: dict[bytes, RadixNode] = {}
        self._by_block: dict[int, RadixNode] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, key: bytes) -> bool:
        return key in self._nodes

    @property
    def num_roots(self) -> int:
        return len(self._roots)

    def node_of(self, block: int) -> RadixNode | None:
        return self._by_block.get(block)

    def match(self, root: bytes, token_ids: Sequence[int], max_tokens: int) -> PrefixMatch:
        """The cached blocks that ``token_ids[:max_tokens]`` starts with, under the salt root
        ``root`` (``block_hash.root_key``): whole blocks, then how far into the next one."""
        node = self._roots.get(root)
        if node is None:
            return PrefixMatch([])
        bs = self.block_size
        nodes: list[RadixNode] = []
        for i in range(max_tokens // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            child = self._nodes.get(block_key(node.key, tokens))
            if child is None or child.parent is not node or child.tokens != tokens:
                break
            nodes.append(child)
            node = child
        start = len(nodes) * bs
        return PrefixMatch(nodes, self._partial(node, token_ids[start:min(start + bs, max_tokens)]))

    @staticmethod
    def _partial(node: RadixNode, tail: Sequence[int]) -> int:
        """Longest common prefix of ``tail`` with a child block of ``node``."""
        if not tail:
            return 0
        best = 0
        for child in node.children.get(tail[0], ()):
            n = 0
            for a, b in zip(child.tokens, tail):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return min(best, len(tail))

    def insert(self, parent: bytes, key: bytes, token_ids: Sequence[int], block: int,
               first: bool) -> bool:
        """Index ``block`` (holding ``token_ids``, key ``key``) under ``parent``.

        ``first``: ``parent`` is a salt root (made here if new). Returns False, indexing
        nothing, if the key is cached already (by another block with the same content) or the
        parent is no longer indexed (evicted).
        """
        assert len(token_ids) == self.block_size and block >= 0
        if block in self._by_block:
            return False
        held = self._nodes.get(key)
        if held is not None:
            if not held.is_hollow or held.tokens != tuple(token_ids):
                return False
            held.block = block  # recomputed: the hollow node holds KV again
            self._by_block[block] = held
            return True
        if first:
            up = self._roots.get(parent)
            if up is None:
                up = self._roots[parent] = RadixNode(parent, (), NO_BLOCK, None)
        else:
            up = self._nodes.get(parent)  # type: ignore[assignment]
            if up is None:
                return False
        node = RadixNode(key, tuple(token_ids), block, up)
        up.children.setdefault(node.tokens[0], []).append(node)
        self._nodes[key] = node
        self._by_block[block] = node
        return True

    def hollow(self, block: int) -> None:
        """Keep ``block``'s node as a path to the blocks below it, without its KV (the caller
        frees the block)."""
        node = self._by_block.pop(block)
        node.block = NO_BLOCK

    def remove_subtree(self, block: int) -> list[int]:
        """Drop ``block``'s node and every node below it; returns their blocks (its own first,
        hollow ones left out). Hollow ancestors left with nothing below them go too.

        Descendants go too: without their parent no prompt can reach them.
        """
        node = self._by_block[block]
        removed = []
        for n in node.walk():
            del self._nodes[n.key]
            if not n.is_hollow:
                del self._by_block[n.block]
                removed.append(n.block)
        up = node.parent
        while up is not None:
            kids = up.children[node.tokens[0]]
            kids.remove(node)
            if not kids:
                del up.children[node.tokens[0]]
            if up.children:
                break
            if up.parent is None:
                del self._roots[up.key]
                break
            if not up.is_hollow:
                break
            del self._nodes[up.key]  # a hollow node that leads nowhere now
            node, up = up, up.parent
        return removed
