"""One sequence under generation: its tokens, loss mask, behaviour log-probs, block table, tool state.

Token in, token out: `token_ids` only ever grows by sampled tokens (mask 1, their log-prob) or by
feedback tokens encoded once (mask 0, log-prob 0). Nothing is decoded and re-encoded.
"""
from __future__ import annotations

from concurrent.futures import Future
from enum import Enum, auto
from itertools import count

from cir.engine.config import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()  # needs its KV (re)computed from num_cached_tokens; not holding a running slot
    RUNNING = auto()  # in the running batch
    TOOL = auto()  # paused at a closed code block, waiting for the sandbox
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, group_id: int = 0, sample_idx: int = 0,
                 seed_key: int | None = None):
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
        # a token sampled but not yet read back is a -1 at the end of token_ids (the engine fills it one
        # step later; its row in that step's tokens on the device is ModelRunner.pending_rows[seed_slot])
        self.max_response_tokens = params.max_tokens  # the engine lowers it to fit max_model_len
        self.max_num_tokens = len(prompt_ids) + params.max_tokens  # prompt + most response tokens
        self.seed_slot = 0  # index of this sequence in the generate call (seed bases, per-sequence arrays)
        # tool state
        self.num_tool_calls = 0
        self.num_tool_successes = 0
        self.pending_tool: Future | None = None
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

    def append_sampled(self, token_id: int, logprob: float) -> None:
        self.token_ids.append(token_id)
        self.loss_mask.append(1)
        self.logprobs.append(logprob)

    def append_feedback(self, token_ids: list[int]) -> None:
        self.token_ids.extend(token_ids)
        self.loss_mask.extend([0] * len(token_ids))
        self.logprobs.extend([0.0] * len(token_ids))
        self.scan_offset = 0
