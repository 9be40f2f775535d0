"""Block manager: owns the ids of the paged KV pool. Knows nothing of tensors.

- Blocks are ref-counted; a free list holds blocks with no reference.
- Prefix caching: a block that becomes full gets a chained hash (hash of the previous block's hash
  and its own token ids). A new sequence whose leading full blocks hash the same reuses them; a
  freed block keeps its hash until it is handed out again, so a later prompt can still hit it.
- Sharing: the n samples of a prompt share every prompt block, the partial last one included
  (`share`). Before a sequence writes into a block someone else also references, it gets a private
  copy (copy-on-write): `append_slots` returns the (src, dst) block copies the model runner performs.
"""
from __future__ import annotations

from collections import OrderedDict

from cir.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev_hash: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((prev_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # O(1) remove
        self.hash_to_block_id: dict[int, int] = {}
        self.num_cache_hits = 0  # tokens served from the prefix cache (statistics)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # 1) allocation -------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_count == 0
        if block.hash is not None and self.hash_to_block_id.get(block.hash) == block_id:
            del self.hash_to_block_id[block.hash]
        block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]  # a cached free block comes back to life
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence with no blocks the cached blocks of its longest hashed prefix.

        At least one token is left uncomputed, so the step that finishes the prefill has logits
        to sample from.
        """
        assert not seq.block_table and seq.num_cached_tokens == 0
        if not self.enable_prefix_caching:
            return
        prev_hash = None
        for i in range((len(seq) - 1) // self.block_size):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            h = chain_hash(prev_hash, tokens)
            block_id = self.hash_to_block_id.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            seq.num_cached_tokens += self.block_size
            self.num_cache_hits += self.block_size
            prev_hash = h
        seq.table_version += 1

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks that `append_slots(seq, num_tokens)` will take (copy-on-write included)."""
        needed = self.num_blocks_for(seq.num_cached_tokens + num_tokens) - len(seq.block_table)
        first = seq.num_cached_tokens // self.block_size
        if seq.num_cached_tokens % self.block_size and self.blocks[seq.block_table[first]].ref_count > 1:
            needed += 1
        return max(needed, 0)

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_tokens: int) -> list[tuple[int, int]]:
        """Make room for K/V of the next `num_tokens` tokens; returns block copies (src, dst) to do."""
        copies = []
        first = seq.num_cached_tokens // self.block_size
        if seq.num_cached_tokens % self.block_size:
            src = seq.block_table[first]
            if self.blocks[src].ref_count > 1:  # copy-on-write of a shared, partially filled block
                dst = self._take_free_block()
                self.blocks[src].ref_count -= 1
                seq.block_table[first] = dst
                copies.append((src, dst))
        while len(seq.block_table) < self.num_blocks_for(seq.num_cached_tokens + num_tokens):
            seq.block_table.append(self._take_free_block())
        seq.table_version += 1
        return copies

    def append_blocks(self, seqs: list[Sequence]) -> list[int]:
        """One fresh block at the end of each sequence's table (a decode step that crosses into a new
        block: nothing to copy); the caller has checked that enough blocks are free. The new ids."""
        block_ids = [self._take_free_block() for _ in seqs]
        for seq, block_id in zip(seqs, block_ids, strict=True):
            seq.block_table.append(block_id)
            seq.table_version += 1
        return block_ids

    # 2) after a forward ----------------------------------------------------------------------------
    def hash_full_blocks(self, seq: Sequence, start: int, end: int | None = None) -> None:
        """Hash the blocks filled between token `start` and `end` (default `seq.num_cached_tokens`)."""
        end = seq.num_cached_tokens if end is None else end
        for i in range(start // self.block_size, end // self.block_size):
            block = self.blocks[seq.block_table[i]]
            if block.hash is not None:
                continue
            prev_hash = self.blocks[seq.block_table[i - 1]].hash if i > 0 else None
            block.token_ids = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block.hash = chain_hash(prev_hash, block.token_ids)
            self.hash_to_block_id.setdefault(block.hash, block.block_id)

    # 3) sharing and freeing ----------------------------------------------------------------------
    def share(self, src: Sequence, dst: Sequence) -> None:
        """`dst` (same prompt) references all of `src`'s blocks and computed tokens."""
        assert not dst.block_table
        for block_id in src.block_table:
            self._ref(block_id)
        dst.block_table = list(src.block_table)
        dst.table_version += 1
        dst.num_cached_tokens = src.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                # hashed blocks go to the back so they stay reusable for as long as possible
                self.free_block_ids[block_id] = None
                if block.hash is None:
                    self.free_block_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.table_version += 1
        seq.num_cached_tokens = 0
