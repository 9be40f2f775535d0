"""Model runner: turns a scheduled batch into tensors, runs the model on the paged cache, samples.

It runs the training model's own parameters (no copy). Per step:
1) input ids, positions, slot mapping, block tables, sequence lengths of the scheduled tokens;
2) `model.forward_hidden(ids, positions, ctx)` on the packed tokens (mixed prefill + decode); on
   CUDA a decode-only step replays the CUDA graph of its batch-size bucket instead (cuda_graphs.py);
3) logits only for the rows that sample (the last token of each sequence that reaches its end),
   computed in float32; a group leader finishing its prompt gets one row per sample of its group;
4) `kernels.sample` with each row's own temperature / top-p / top-k / min-p and its own seed (see
   `sequence_seed`), no host sync until the tokens are read back.
Exact mode (`model.batch_invariant`, see Transformer.set_batch_invariant): eager steps only, and the
recorded behaviour log-prob of each sampled token comes from `model.token_logprobs`, the training
forward's own reduction, instead of the sampler's softmax (`exact_logprobs`).
"""
from __future__ import annotations

import torch

from cir.engine.cuda_graphs import DecodeGraphs
from cir.engine.kv_cache import KVCache
from cir.engine.scheduler import ScheduledBatch
from cir.engine.sequence import Sequence
from kernels import sample


_MASK64 = (1 << 64) - 1


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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, seed: int = 0):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = kv_cache.block_size
        self.generator = torch.Generator(device="cpu")  # one draw per generate call: the call seed
        self.generator.manual_seed(seed)
        self.call_seed = 0
        self.graphs: DecodeGraphs | None = None  # set by the engine on CUDA (EngineConfig.cuda_graphs)

    def new_call(self) -> None:
        """Draw this generate call's seed (the generator state is what checkpoints save)."""
        self.call_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))

    def _step_inputs(self, batch: ScheduledBatch) -> tuple[list, list, list, list, list]:
        """Host lists of one step: input ids, positions, KV slots, block tables, sequence lengths."""
        input_ids, positions, slots, tables, seq_lens = [], [], [], [], []
        bs = self.block_size
        for seq, num_tokens in zip(batch.seqs, batch.num_tokens):
            start, end = seq.num_cached_tokens, seq.num_cached_tokens + num_tokens
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            tables.append(table)
            seq_lens.append(end)
        return input_ids, positions, slots, tables, seq_lens

    def _forward_eager(self, batch: ScheduledBatch, input_ids, positions, slots, tables, seq_lens) -> torch.Tensor:
        cu_seqlens = [0]
        for num_tokens in batch.num_tokens:
            cu_seqlens.append(cu_seqlens[-1] + num_tokens)
        width = max(map(len, tables))

        def tensor(x: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(x, dtype=dtype, pin_memory=self.device.type == "cuda").to(
                self.device, non_blocking=True)

        keys = {}
        if self.kv_cache.attention_backend == "flash_attn":
            cu_seqlens_k = [0]
            for n in seq_lens:
                cu_seqlens_k.append(cu_seqlens_k[-1] + n)
            keys = dict(cu_seqlens_k=tensor(cu_seqlens_k, torch.int32), max_seqlen_k=max(seq_lens))
        ctx = self.kv_cache.context(
            slot_mapping=tensor(slots, torch.int64),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            block_tables=tensor([t + [0] * (width - len(t)) for t in tables], torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            max_seqlen_q=max(batch.num_tokens),
            **keys,
        )
        return self.model.forward_hidden(tensor(input_ids, torch.int64), tensor(positions, torch.int64), ctx)

    def _sampling_rows(self, batch: ScheduledBatch) -> tuple[list[int], list[Sequence]]:
        """Packed-token index of each row to sample, and the sequence the row belongs to."""
        rows, owners, end = [], [], 0
        for i, (seq, num_tokens) in enumerate(zip(batch.seqs, batch.num_tokens)):
            end += num_tokens
            if batch.samples(i):
                for member in [seq, *seq.followers]:
                    rows.append(end - 1)
                    owners.append(member)
        return rows, owners

    @torch.no_grad()
    def forward(self, batch: ScheduledBatch) -> tuple[list[Sequence], torch.Tensor]:
        """One forward over the batch: the sequences that sample and their float32 logits (R, V)."""
        self.kv_cache.copy_blocks(batch.copies)
        inputs = self._step_inputs(batch)
        graphs = None if getattr(self.model, "batch_invariant", False) else self.graphs
        if graphs is not None and len(batch) <= graphs.max_batch and all(n == 1 for n in batch.num_tokens):
            hidden = graphs.run(*inputs)  # decode step: replay the bucket's graph
        else:
            hidden = self._forward_eager(batch, *inputs)  # (T, D)
        rows, owners = self._sampling_rows(batch)
        row_index = torch.tensor(rows, dtype=torch.int64, device=self.device)
        self.sampled_hidden = hidden[row_index]  # (R, D): exact mode recomputes the log-probs from it
        return owners, self.model.compute_logits(self.sampled_hidden).float().contiguous()

    @torch.no_grad()
    def sample(self, owners: list[Sequence], logits: torch.Tensor) -> tuple[list[int], list[float]]:
        if not owners:
            return [], []
        params = [seq.params for seq in owners]

        def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        tokens, logprobs = sample(
            logits,
            temperature=column([p.temperature for p in params]),
            top_p=column([p.top_p for p in params]),
            top_k=column([p.top_k for p in params], torch.int64),
            min_p=column([p.min_p for p in params]),
            generator=column([sequence_seed(self.call_seed, seq) for seq in owners], torch.int64),
        )
        return tokens.tolist(), logprobs.tolist()

    def run(self, batch: ScheduledBatch) -> tuple[list[Sequence], list[int], list[float]]:
        """Forward, then sample: the sequences that sampled, their tokens and behaviour log-probs."""
        owners, logits = self.forward(batch)
        tokens, logprobs = self.sample(owners, logits)
        if owners and getattr(self.model, "batch_invariant", False):
            logprobs = self.exact_logprobs(owners, tokens)
        return owners, tokens, logprobs

    @torch.no_grad()
    def exact_logprobs(self, owners: list[Sequence], tokens: list[int]) -> list[float]:
        """The sampled tokens' log-probs by the training forward's reduction (`model.token_logprobs`
        at the temperature the trainer uses: the row's own, 1 for greedy rows)."""
        temperatures = [seq.params.temperature or 1.0 for seq in owners]
        targets = torch.tensor(tokens, dtype=torch.int64, device=self.device)
        logprobs = torch.empty(len(owners), dtype=torch.float32, device=self.device)
        for temperature in sorted(set(temperatures)):
            idx = torch.tensor([i for i, t in enumerate(temperatures) if t == temperature], device=self.device)
            logprobs[idx] = self.model.token_logprobs(self.sampled_hidden[idx], targets[idx], temperature)
        return logprobs.tolist()
