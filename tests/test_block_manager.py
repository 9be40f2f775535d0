"""Block manager bookkeeping: ref-counts, free list, chained-hash prefix reuse, copy-on-write."""
import pytest

from cir.engine.block_manager import BlockManager
from cir.engine.config import SamplingParams
from cir.engine.sequence import Sequence


def seq_of(tokens: list[int]) -> Sequence:
    return Sequence(tokens, SamplingParams())


def computed(bm: BlockManager, seq: Sequence) -> Sequence:
    """Allocate and mark every uncomputed token of `seq` as computed, as Scheduler.postprocess does
    after one engine step (the count, then the blocks that filled get their hash)."""
    n, start = seq.num_uncomputed_tokens, seq.num_cached_tokens
    assert bm.can_append(seq, n)
    bm.append_slots(seq, n)
    seq.num_cached_tokens += n
    bm.hash_full_blocks(seq, start)
    return seq


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = computed(bm, seq_of(list(range(10))))
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    bm.free(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == [] and seq.num_cached_tokens == 0


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    a = computed(bm, seq_of(list(range(12))))
    b = seq_of(list(range(12)))
    bm.match_prefix(b)
    # 12 tokens = 3 full blocks, but the last token must be computed for logits: 2 blocks reused
    assert b.block_table == a.block_table[:2] and b.num_cached_tokens == 8
    c = seq_of(list(range(8)) + [99, 98, 97])
    bm.match_prefix(c)
    assert c.block_table == a.block_table[:2]
    d = seq_of([5] + list(range(1, 12)))  # differs in block 0: the chain breaks at once
    bm.match_prefix(d)
    assert d.block_table == [] and d.num_cached_tokens == 0
    assert bm.blocks[a.block_table[0]].ref_count == 3


def test_freed_hashed_block_is_still_reusable_until_handed_out():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, seq_of(list(range(9))))
    table = list(a.block_table)
    bm.free(a)
    b = seq_of(list(range(9)))
    bm.match_prefix(b)
    assert b.block_table == table[:2] and bm.num_free_blocks == 2


def test_share_then_copy_on_write_of_partial_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    leader = computed(bm, seq_of(list(range(6))))  # blocks: [full, partial(2 tokens)]
    follower = seq_of(list(range(6)))
    bm.share(leader, follower)
    assert follower.block_table == leader.block_table
    assert all(bm.blocks[b].ref_count == 2 for b in leader.block_table)
    leader.token_ids.append(6)
    assert bm.num_blocks_needed(leader, 1) == 1  # the private copy of the shared partial block
    copies = bm.append_slots(leader, 1)
    assert copies == [(follower.block_table[1], leader.block_table[1])]
    assert leader.block_table[0] == follower.block_table[0] and leader.block_table[1] != follower.block_table[1]
    assert bm.blocks[follower.block_table[1]].ref_count == 1
    follower.token_ids.append(7)
    assert bm.append_slots(follower, 1) == []  # now the only owner: writes in place


def test_cannot_append_when_pool_is_full():
    bm = BlockManager(num_blocks=2, block_size=4)
    computed(bm, seq_of(list(range(8))))
    other = seq_of([1, 2, 3])
    assert not bm.can_append(other, 3)


@pytest.mark.parametrize("enable", [True, False])
def test_prefix_caching_switch(enable):
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=enable)
    computed(bm, seq_of([1, 2, 3, 4, 5]))
    b = seq_of([1, 2, 3, 4, 5])
    bm.match_prefix(b)
    assert b.num_cached_tokens == (4 if enable else 0)
