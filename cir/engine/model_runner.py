"""Model runner: turns a scheduled batch into tensors, runs the model on the paged cache, samples.

`run(batch, ctx)` is the middle of the engine's three calls (Scheduler.schedule -> ModelRunner.run ->
Scheduler.postprocess): inputs in, the step's tokens and log-probs out, left on the device. It changes
no sequence and calls nothing back; what a call needs travels in the batch (the unread previous step's
tokens) or in the generate call's `CallContext` (seed bases, sampling settings, the block-table rows
and the seeds of the coming decode steps it keeps between steps).

It runs the training model's own parameters (no copy). Per step:
1) input ids, positions, slot mapping, block tables, sequence lengths of the scheduled tokens, built
   as numpy arrays (one list comprehension per field, no Python call per sequence). A token the
   previous step sampled is not on the host yet: its id is -1 in `seq.token_ids`, gathered on the
   device from the previous step's tokens (`batch.prev_tokens`, row i that of `batch.prev_slots[i]`). A step that
   decodes the running batch again (`batch.decode`, decode_state.py) takes its inputs from the
   state's arrays, and its input ids are the previous step's tokens as they are;
2) `model.forward_hidden(ids, positions, ctx)` on the packed tokens (mixed prefill + decode); on
   CUDA a decode-only step replays the CUDA graph of its batch-size bucket instead (cuda_graphs.py);
3) logits only for the rows that sample (the last token of each sequence that reaches its end),
   computed in float32; a group leader finishing its prompt gets one row per sample of its group;
4) `cir_kernels.sample` with each row's own temperature / top-p / top-k / min-p and its own seed (see
   `sequence_seeds`, vectorised), no host sync: tokens and log-probs stay on the device.
The scheduler reads the previous step's tokens after `run` returns, while the device computes this one.
Exact mode (`model.batch_invariant`, see Transformer.set_batch_invariant): eager steps only, and the
recorded behaviour log-prob of each sampled token comes from `model.token_logprobs`, the training
forward's own reduction, instead of the sampler's softmax (`exact_logprobs`).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from operator import attrgetter

import numpy as np
import torch

from cir.engine.config import SamplingParams
from cir.engine.cuda_graphs import DecodeGraphs
from cir.engine.decode_state import DecodeState
from cir.engine.kv_cache import KVCache
from cir.engine.launched_step import StepOutput
from cir.engine.scheduled_batch import ScheduledBatch
from cir.engine.sequence import Sequence
from cir_kernels import sample


_MASK64 = (1 << 64) - 1
_SEEDS_AHEAD = 16  # decode steps whose seeds are hashed together (DecodeState.seeds)
# per-sequence fields read in C (map over a batch runs no Python frame per sequence)
_num_cached = attrgetter("num_cached_tokens")
_seed_slot, _token_ids, _num_prompt = (attrgetter(f) for f in ("seed_slot", "token_ids", "num_prompt_tokens"))
_table_version = attrgetter("table_version")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def sequence_seed(call_seed: int, seq: Sequence) -> int:
    """The seed of one draw: (this generate call, prompt key, sample, position) and nothing else, so
    the tokens do not depend on batch composition, preemption or sandbox timing (nor on the split
    over ranks, when the prompt keys are global indices)."""
    h = call_seed
    for part in (seq.seed_key, seq.sample_idx, seq.num_response_tokens):
        h = _splitmix64(h ^ part)
    return h >> 1  # non-negative int64


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)  # uint64 arithmetic wraps like the & _MASK64 above
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sequence_seeds(call_seed: int, keys: list[int], samples: list[int], positions: list[int]) -> np.ndarray:
    """`sequence_seed` of many draws at once (int64, equal draw by draw)."""
    return draw_seeds(seed_bases(call_seed, keys, samples), positions)


def seed_bases(call_seed: int, keys: list[int], samples: list[int]) -> np.ndarray:
    """The part of each draw's seed fixed for a sequence in one generate call (uint64), hashed once."""
    h = np.full(len(keys), call_seed & _MASK64, dtype=np.uint64)
    for part in (keys, samples):
        h = _splitmix64_array(h ^ np.asarray(part, dtype=np.int64).astype(np.uint64))
    return h


def draw_seeds(bases: np.ndarray, positions) -> np.ndarray:
    """Each draw's seed from its sequence's base and its position in the response (int64)."""
    h = _splitmix64_array(bases ^ np.asarray(positions, dtype=np.int64).astype(np.uint64))
    return (h >> np.uint64(1)).astype(np.int64)


@dataclass
class StepInputs:
    """One step's inputs: token ids on the device, the rest host arrays."""

    input_ids: torch.Tensor  # (T,) int64, on the device
    positions: np.ndarray  # (T,) int64
    slots: np.ndarray  # (T,) int64: flat KV slot of each token
    block_tables: np.ndarray  # (B, W) int32, zero-padded
    seq_lens: np.ndarray  # (B,) int32: cached + new tokens
    cu_seqlens_q: np.ndarray  # (B + 1,) int32
    max_seqlen_q: int


@dataclass
class CallContext:
    """What the runner keeps for one generate call, per sequence indexed by `seq.seed_slot`."""

    seed_bases: np.ndarray  # (N,) uint64: each sequence's part of its draws' seeds
    shared_params: SamplingParams | None  # the SamplingParams of every sequence, when one
    table_rows: np.ndarray  # (N, max blocks) int32: block tables as numpy rows
    table_lens: np.ndarray  # (N,) int64
    table_versions: np.ndarray  # (N,) int64: `seq.table_version` each row was written at
    seeds: np.ndarray | None = None  # (K, B) the seeds of K decode steps of `seeds_state` (sample)
    seeds_state: DecodeState | None = None
    seeds_step: int = 0  # the state's step of row 0 of `seeds`


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, seed: int = 0, graphs: DecodeGraphs | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.block_size
        self.generator = torch.Generator(device="cpu")  # one draw per generate call: the call seed
        self.generator.manual_seed(seed)
        self.call_seed = 0
        self.graphs = graphs  # decode steps as CUDA graphs (EngineConfig.cuda_graphs), or None
        self._aranges: dict[int, np.ndarray] = {}  # cu_seqlens_q of decode steps, by batch size

    def begin_call(self, seqs: list[Sequence], max_blocks: int, shared_params: SamplingParams | None,
                   bases: np.ndarray | None = None) -> CallContext:
        """Per generate call: draw its seed (the generator state is what checkpoints save), hash each
        sequence's seed base (`bases`: given, for sequences carried over from earlier calls), make room
        for each block table as a numpy row (by seq.seed_slot), rewritten only when the block manager
        changed the table (`seq.table_version`)."""
        self.call_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        if self.graphs is not None:
            self.graphs.check()  # a new pool or new parameter storage: capture again
        if bases is None:
            bases = seed_bases(self.call_seed, [s.seed_key for s in seqs], [s.sample_idx for s in seqs])
        ctx = CallContext(np.zeros(0, dtype=np.uint64), shared_params, np.zeros((0, max_blocks), dtype=np.int32),
                          np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
        self.extend_call(ctx, bases)
        return ctx

    @staticmethod
    def extend_call(ctx: CallContext, bases: np.ndarray) -> None:
        """Sequences joined the call (the next seed slots, in order): their seed bases and table rows."""
        num = len(bases)
        ctx.seed_bases = np.concatenate([ctx.seed_bases, np.asarray(bases, dtype=np.uint64)])
        ctx.table_rows = np.concatenate([ctx.table_rows, np.zeros((num, ctx.table_rows.shape[1]), dtype=np.int32)])
        ctx.table_lens = np.concatenate([ctx.table_lens, np.zeros(num, dtype=np.int64)])
        ctx.table_versions = np.concatenate([ctx.table_versions, np.full(num, -1, dtype=np.int64)])

    def release_graphs(self) -> None:
        """Forget captured CUDA graphs (they point into a KV pool that is going away)."""
        if self.graphs is not None:
            self.graphs.reset()

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    def _decode_inputs(self, state: DecodeState, prev_tokens: torch.Tensor) -> StepInputs:
        """The running batch decodes again: every input is the token the previous step sampled for
        the same row, so the input ids are the previous step's tokens; the rest from the state's arrays."""
        num_seqs = len(state)
        cu_seqlens_q = self._aranges.get(num_seqs)
        if cu_seqlens_q is None:
            cu_seqlens_q = self._aranges[num_seqs] = np.arange(num_seqs + 1, dtype=np.int32)
        return StepInputs(prev_tokens, state.starts, state.slot_mapping, state.tables, state.seq_lens,
                          cu_seqlens_q, 1)

    def _step_inputs(self, batch: ScheduledBatch, ctx: CallContext) -> StepInputs:
        """Per-sequence fields gathered by `map(attrgetter)` (no Python frame per sequence), the
        rest numpy."""
        prev_tokens = batch.prev_tokens
        if batch.decode is not None and batch.decode.num_steps:
            return self._decode_inputs(batch.decode, prev_tokens)
        seqs, num_tokens, bs, num_seqs = batch.seqs, batch.num_tokens, self.block_size, len(batch.seqs)
        starts = np.fromiter(map(_num_cached, seqs), dtype=np.int64, count=num_seqs)
        block_tables = self._block_tables(seqs, ctx)
        pending_rows = self._pending_rows(seqs, batch.prev_slots, len(ctx.table_lens))
        if batch.is_plain_decode and pending_rows.min() >= 0:
            # steady decode: every input is a token the previous step sampled, still on the device
            positions, seq_of_token = starts, None
            cu_seqlens_q = np.arange(num_seqs + 1, dtype=np.int32)
            input_ids = prev_tokens[self._to_device(pending_rows)]
        else:
            if max(num_tokens) == 1:
                ids = np.array([s.token_ids[p] for s, p in zip(seqs, starts.tolist(), strict=True)], dtype=np.int64)
                positions, seq_of_token = starts, None
                cu_seqlens_q = np.arange(num_seqs + 1, dtype=np.int32)
            else:
                ids = np.array(list(chain.from_iterable(
                    [s.token_ids[p : p + n] for s, p, n in zip(seqs, starts.tolist(), num_tokens, strict=True)])),
                    dtype=np.int64)
                counts = np.array(num_tokens, dtype=np.int64)
                cu_seqlens_q = np.zeros(num_seqs + 1, dtype=np.int32)
                np.cumsum(counts, out=cu_seqlens_q[1:])
                seq_of_token = np.repeat(np.arange(num_seqs), counts)
                positions = np.arange(len(ids), dtype=np.int64) - np.repeat(cu_seqlens_q[:-1] - starts, counts)
            input_ids = self._to_device(ids)
            pending = np.flatnonzero(ids < 0)  # tokens the previous step sampled: still on the device
            if len(pending):
                rows = pending_rows[pending if seq_of_token is None else seq_of_token[pending]]
                input_ids[self._to_device(pending)] = prev_tokens[self._to_device(rows)]
        owner = np.arange(num_seqs) if seq_of_token is None else seq_of_token
        slots = block_tables[owner, positions // bs].astype(np.int64) * bs + positions % bs
        seq_lens = (starts + np.asarray(num_tokens, dtype=np.int64)).astype(np.int32)
        return StepInputs(input_ids, positions, slots, block_tables, seq_lens, cu_seqlens_q, max(num_tokens))

    @staticmethod
    def _pending_rows(seqs: list[Sequence], prev_slots: np.ndarray | None, num_slots: int) -> np.ndarray:
        """Each sequence's row in the previous step's tokens, -1 if its last token is on the host.
        (When a step's inputs are built, every token of the previous step is unread and every earlier
        one read.)"""
        if prev_slots is None or not len(prev_slots):
            return np.full(len(seqs), -1, dtype=np.int64)
        rows = np.full(num_slots, -1, dtype=np.int64)  # per sequence of the call
        rows[prev_slots] = np.arange(len(prev_slots))
        return rows[np.fromiter(map(_seed_slot, seqs), dtype=np.int64, count=len(seqs))]

    @staticmethod
    def _block_tables(seqs: list[Sequence], ctx: CallContext) -> np.ndarray:
        """(B, W) int32 zero-padded block tables: rows kept across steps, only changed ones rewritten
        (a decode step rewrites the ~1/block_size of them that crossed into a new block)."""
        num_seqs = len(seqs)
        slots = np.fromiter(map(_seed_slot, seqs), dtype=np.int64, count=num_seqs)
        versions = np.fromiter(map(_table_version, seqs), dtype=np.int64, count=num_seqs)
        rows, lens, seen = ctx.table_rows, ctx.table_lens, ctx.table_versions
        for i in np.flatnonzero(versions != seen[slots]).tolist():
            seq, slot = seqs[i], slots[i]
            table, old = seq.block_table, lens[slot]
            rows[slot, : len(table)] = table
            if old > len(table):
                rows[slot, len(table) : old] = 0
            lens[slot], seen[slot] = len(table), versions[i]
        return rows[slots, : max(int(lens[slots].max()), 1)]

    def _forward_eager(self, inputs: StepInputs) -> torch.Tensor:
        keys = {}
        if self.kv_cache.attention_backend == "flash_attn":
            cu_seqlens_k = np.zeros(len(inputs.seq_lens) + 1, dtype=np.int32)
            np.cumsum(inputs.seq_lens, out=cu_seqlens_k[1:])
            keys = dict(cu_seqlens_k=self._to_device(cu_seqlens_k), max_seqlen_k=int(inputs.seq_lens.max()))
        ctx = self.kv_cache.context(
            slot_mapping=self._to_device(inputs.slots),
            cu_seqlens_q=self._to_device(inputs.cu_seqlens_q),
            block_tables=self._to_device(inputs.block_tables),
            seq_lens=self._to_device(inputs.seq_lens),
            max_seqlen_q=inputs.max_seqlen_q,
            **keys,
        )
        return self.model.forward_hidden(inputs.input_ids, self._to_device(inputs.positions), ctx)

    def _sampling_rows(self, batch: ScheduledBatch) -> tuple[np.ndarray | None, list[Sequence]]:
        """Packed-token index of each row to sample (None: every token, in order) and its sequence.
        A leader that finishes its prompt samples one row per member of its group."""
        if batch.is_plain_decode:
            return None, batch.seqs if batch.decode is not None else list(batch.seqs)
        rows, owners, end = [], [], 0
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            end += n
            if seq.num_cached_tokens + n == len(seq.token_ids):
                for member in [seq, *seq.followers]:
                    rows.append(end - 1)
                    owners.append(member)
        return np.array(rows, dtype=np.int64), owners

    def run(self, batch: ScheduledBatch, ctx: CallContext) -> StepOutput:
        """Forward, then sample: the sequences that sample, their tokens and behaviour log-probs, left
        on the device (nothing waits for them). (Each of the two runs under no_grad.)"""
        owners, logits = self.forward(batch, ctx)
        return StepOutput(owners, *self.sample(owners, logits, ctx, batch.decode))

    @torch.no_grad()
    def forward(self, batch: ScheduledBatch, ctx: CallContext) -> tuple[list[Sequence], torch.Tensor]:
        """One forward over the batch: the sequences that sample and their float32 logits (R, V)."""
        self.kv_cache.copy_blocks(batch.copies)
        inputs = self._step_inputs(batch, ctx)
        graphs = None if getattr(self.model, "batch_invariant", False) else self.graphs
        if graphs is not None and len(batch) <= graphs.max_batch and inputs.max_seqlen_q == 1:
            hidden = graphs.run(inputs.input_ids, inputs.positions, inputs.slots, inputs.block_tables,
                                inputs.seq_lens)  # decode step: replay the bucket's graph
        else:
            hidden = self._forward_eager(inputs)  # (T, D)
        rows, owners = self._sampling_rows(batch)
        sampled = hidden if rows is None else hidden[self._to_device(rows)]  # (R, D)
        logits = self.model.compute_logits(sampled).float().contiguous()
        return owners, logits

    @torch.no_grad()
    def sample(self, owners: list[Sequence], logits: torch.Tensor, ctx: CallContext,
               decode: DecodeState | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (R,) int64 and behaviour log-probs (R,) float32, left on the device. `decode`: the
        owners' arrays when the step is a plain decode of the running batch (`batch.decode`)."""
        if not owners:
            empty = torch.empty(0, device=self.device)
            return empty.long(), empty
        shared = ctx.shared_params
        params = None if shared is not None else [seq.params for seq in owners]

        def column(name: str, dtype: torch.dtype = torch.float32) -> float | int | torch.Tensor:
            if shared is not None:  # one setting for every row: a number, so the sampler skips unused filters
                return getattr(shared, name)
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=self.device)

        num, state = len(owners), decode
        if state is not None:  # plain decode of the running batch: the seeds of the next steps at once
            step = state.num_steps - ctx.seeds_step
            if ctx.seeds_state is not state or step >= len(ctx.seeds):
                ahead = np.arange(_SEEDS_AHEAD)[:, None]  # (K, 1): this step and the K - 1 after it
                bases = ctx.seed_bases[state.slots]
                ctx.seeds = draw_seeds(bases, state.starts + state.seed_positions + ahead)  # (K, B)
                ctx.seeds_state, ctx.seeds_step, step = state, state.num_steps, 0
            seeds = ctx.seeds[step]
        else:  # this call's per-sequence bases, indexed by seq.seed_slot
            bases = ctx.seed_bases[np.fromiter(map(_seed_slot, owners), dtype=np.int64, count=num)]
            lengths = np.fromiter(map(len, map(_token_ids, owners)), dtype=np.int64, count=num)
            seeds = draw_seeds(bases, lengths - np.fromiter(map(_num_prompt, owners), dtype=np.int64, count=num))
        tokens, logprobs = sample(
            logits,
            temperature=column("temperature"),
            top_p=column("top_p"),
            top_k=column("top_k", torch.int64),
            min_p=column("min_p"),
            generator=self._to_device(seeds),
        )
        if getattr(self.model, "batch_invariant", False):
            logprobs = self.exact_logprobs(owners, tokens, logits)
        return tokens, logprobs

    @torch.no_grad()
    def exact_logprobs(self, owners: list[Sequence], tokens: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The sampled tokens' log-probs by the training forward's reduction (`model.logits_logprobs`
        on the logits sampled from, at the temperature the trainer uses: the row's own, 1 for greedy)."""
        temperatures = [seq.params.temperature or 1.0 for seq in owners]
        targets = tokens.to(torch.int64)
        logprobs = torch.empty(len(owners), dtype=torch.float32, device=self.device)
        for temperature in sorted(set(temperatures)):
            idx = torch.tensor([i for i, t in enumerate(temperatures) if t == temperature], device=self.device)
            logprobs[idx] = self.model.logits_logprobs(logits[idx], targets[idx], temperature)
        return logprobs
