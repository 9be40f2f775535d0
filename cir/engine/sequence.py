"""One sequence under generation: its tokens, loss mask, behaviour log-probs, block table, tool state.

Token in, token out: `token_ids` only ever grows by sampled tokens (mask 1, their log-prob) or by
feedback tokens encoded once (mask 0, log-prob 0). Nothing is decoded and re-encoded.

A sequence's fields are written here, by the scheduler (scheduler.py: every change one engine step
makes) and by the block manager (block_manager.py: its block table and cached count); nowhere else
(tests/test_engine_structure.py checks it). The batch-wise writes of a step run as C-level `map`s
over the sequences' own lists (no Python frame per sequence): the functions at the end of this file.
"""
from __future__ import annotations

import copy
from collections import deque
from enum import Enum, auto
from itertools import count, repeat
from operator import attrgetter, setitem

from cir.engine.config import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # needs its KV (re)computed from num_cached_tokens; not holding a running slot
    RUNNING = auto()  # in the running batch
    TOOL = auto()  # paused at a closed code block, waiting for the sandbox
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, group_id: int = 0, sample_idx: int = 0,
                 seed_key: int | None = None, seed_slot: int = 0, max_model_len: int | None = None):
        self.seq_id = next(Sequence._ids)
        self.group_id = group_id
        self.seed_key = group_id if seed_key is None else seed_key  # the prompt's part of each draw's seed
        self.sample_idx = sample_idx
        self.params = params
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.loss_mask: list[int] = []  # per response token
        self.logprobs: list[float] = []  # per response token; 0.0 where masked
        self.block_table: list[int] = []
        self.table_version = 0  # bumped by the block manager at every change of block_table
        self.num_cached_tokens = 0  # tokens whose K/V are in the cache
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.followers: list[Sequence] = []  # samples 1..n-1 of the group, forked after this one's prefill
        # a token sampled but not yet read back is a -1 at the end of token_ids (the scheduler fills it
        # one step later, see Scheduler.postprocess)
        limit = params.max_tokens if max_model_len is None else min(params.max_tokens, max_model_len - len(prompt_ids))
        self.max_response_tokens = limit  # params.max_tokens, lowered to fit max_model_len
        self.max_num_tokens = len(prompt_ids) + limit  # prompt + most response tokens
        self.seed_slot = seed_slot  # index of this sequence in the generate call (seed bases, per-sequence arrays)
        # (response index, policy version) each time a generate call takes the sequence up: the tokens
        # from that index on (until the next mark) were sampled by that version (rollout streams)
        self.version_marks: list[tuple[int, int]] = []
        # tool state
        self.num_tool_calls = 0
        self.num_tool_successes = 0
        self.scan_offset = 0  # chars of the segment's text already scanned for a closing fence
        self.decoder = None  # tools.SegmentDecoder of the current segment, when tools are on
        self.segment_start = len(prompt_ids)  # index in token_ids where the decoder's segment begins

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_response_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def response_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_versions(self) -> list[int]:
        """The policy version of each response token (feedback tokens: the version of their segment)."""
        versions, marks = [], self.version_marks or [(0, 0)]
        for (start, version), (end, _) in zip(marks, [*marks[1:], (self.num_response_tokens, 0)], strict=True):
            versions += [version] * (end - start)
        return versions

    _STATE_FIELDS = ("group_id", "seed_key", "sample_idx", "token_ids", "num_prompt_tokens", "loss_mask", "logprobs",
                     "finish_reason", "max_response_tokens", "max_num_tokens", "version_marks", "num_tool_calls",
                     "num_tool_successes", "scan_offset", "segment_start")

    def state(self) -> dict:
        """What a sequence between generate calls is, as plain data (a checkpoint of a rollout stream):
        tokens, mask, behaviour log-probs, versions, tool state, the decoder's. It holds no blocks then."""
        if self.block_table:
            raise ValueError(f"sequence {self.seq_id} holds KV blocks: only a sequence between calls has a state")
        state = {name: copy.copy(getattr(self, name)) for name in self._STATE_FIELDS}
        state["status"] = self.status.name
        if self.decoder is not None:
            state["decoder"] = {k: copy.copy(v) for k, v in vars(self.decoder).items() if k != "tokenizer"}
        return state

    @classmethod
    def from_state(cls, state: dict, params: SamplingParams, new_decoder=None) -> Sequence:
        """The sequence `state()` described (followers are its stream's to link); `new_decoder` makes the
        segment decoder when the state has one."""
        seq = cls(state["token_ids"][: state["num_prompt_tokens"]], params)
        for name in cls._STATE_FIELDS:
            setattr(seq, name, copy.copy(state[name]))
        seq.version_marks = [tuple(m) for m in seq.version_marks]
        seq.status = SequenceStatus[state["status"]]
        if "decoder" in state:
            if new_decoder is None:
                raise ValueError("the sequence was saved with a tool decoder: pass new_decoder")
            seq.decoder = new_decoder()
            vars(seq.decoder).update({k: copy.copy(v) for k, v in state["decoder"].items()})
        return seq

    def append_feedback(self, token_ids: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.loss_mask.extend([0] * len(token_ids))
        self.logprobs.extend([0.0] * len(token_ids))
        self.scan_offset = 0


def restore_group(states: list[dict], followers: list[list[int]], params: SamplingParams,
                  new_decoder=None) -> list[Sequence]:
    """A group of sequences from their `state()`s, each with its followers (indices into the group)."""
    group = [Sequence.from_state(s, params, new_decoder) for s in states]
    for seq, indices in zip(group, followers, strict=True):
        seq.followers = [group[i] for i in indices]
    return group


_token_ids, _loss_mask, _logprobs = attrgetter("token_ids"), attrgetter("loss_mask"), attrgetter("logprobs")


def consume(iterator) -> None:
    """Run a `map` for its side effects, in C."""
    deque(iterator, maxlen=0)


def append_placeholders(token_lists: list[list[int]]) -> None:
    """Each list gains a -1: the token its sequence sampled in a step whose tokens are not read yet."""
    consume(map(list.append, token_lists, repeat(-1)))


def fill_placeholders(token_lists: list[list[int]], tokens: list[int]) -> None:
    """The read tokens replace the placeholders, in order."""
    consume(map(setitem, token_lists, repeat(-1), tokens))


def token_lists(seqs: list[Sequence]) -> list[list[int]]:
    return list(map(_token_ids, seqs))


def record_sampled(seqs: list[Sequence], logprobs: list[float]) -> None:
    """One sampled token each: loss mask 1 and its behaviour log-prob."""
    consume(map(list.append, map(_loss_mask, seqs), repeat(1)))
    consume(map(list.append, map(_logprobs, seqs), logprobs))


def record_sampled_steps(seqs: list[Sequence], logprobs: list[list[float]], num_steps: int) -> None:
    """`num_steps` sampled tokens each (row i: sequence i's log-probs in step order)."""
    consume(map(list.extend, map(_logprobs, seqs), logprobs))
    consume(map(list.extend, map(_loss_mask, seqs), repeat([1] * num_steps)))


def set_num_cached(seqs: list[Sequence], counts: list[int]) -> None:
    consume(map(setattr, seqs, repeat("num_cached_tokens"), counts))
