"""The engine's CUDA attention backends, run on CPU: the Triton paged kernel (interpreted) and the
flash-attn call (flash-attn cannot be installed here; a torch twin of its documented paged-varlen
semantics checks the arguments the engine passes). Each compares every sampled row with a full
forward, over mixed prefill + decode steps, chunked prefill and prefix sharing."""
import math

import pytest
import torch
import torch.nn.functional as F
from engine_utils import tiny_model
from test_engine import assert_rows_match_full_forward, make_engine, prompts_of, record_logits

import cir.engine.kv_cache as kv_cache_module
from cir.engine import SamplingParams
from cir.engine.kv_cache import attention_backend


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert attention_backend(cpu, torch.bfloat16, 256) == "torch"
    expected = "triton" if kv_cache_module.flash_attn_varlen_func is None else "flash_attn"
    assert attention_backend(cuda, torch.bfloat16, 256) == expected
    assert attention_backend(cuda, torch.bfloat16, 16) == "triton"  # flash-attn 2 pages: 256k tokens
    assert attention_backend(cuda, torch.float32, 256) == "triton"


def generate_and_check(engine, model):
    seen = record_logits(engine)
    shared = prompts_of([6], seed=21)[0]
    prompts = [shared + tail for tail in prompts_of([2, 9, 15], seed=22)]
    trajs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True), n=2)
    assert all(len(t.response_ids) == 6 for t in trajs)
    assert engine.stats["num_prefix_cache_hit_tokens"] > 0
    assert_rows_match_full_forward(model, seen)


def test_engine_on_the_triton_kernel():
    model = tiny_model(seed=23, num_kv_heads=2)
    engine = make_engine(model, max_num_batched_tokens=12)  # prompts are chunked: mixed steps
    engine.kv_cache.backend = "triton"
    generate_and_check(engine, model)


def paged_varlen_twin(calls):
    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               dropout_p=0.0, softmax_scale=None, causal=False, block_table=None):
        """flash-attn 2.6's documented semantics with a paged cache: k/v (num_blocks, page, Hkv, D);
        sequence b's keys are its first cu_k[b+1] - cu_k[b] tokens through block_table[b]; causal
        masks align to the bottom right (query i of q_len sees keys j <= L - q_len + i)."""
        assert causal and block_table is not None and block_table.dtype == torch.int32
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        page = k.shape[1]
        out = torch.empty_like(q)
        cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for b in range(len(cu_q) - 1):
            q_len, kv_len = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
            assert 0 < q_len <= max_seqlen_q and kv_len <= max_seqlen_k
            pages = block_table[b, : math.ceil(kv_len / page)].long()
            keys, values = (x[pages].flatten(0, 1)[:kv_len].transpose(0, 1) for x in (k, v))
            queries = q[cu_q[b] : cu_q[b + 1]].transpose(0, 1)
            visible = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - q_len, kv_len)[:, None]
            o = F.scaled_dot_product_attention(queries, keys, values, attn_mask=visible, enable_gqa=True)
            out[cu_q[b] : cu_q[b + 1]] = o.transpose(0, 1)
        calls.append(len(cu_q) - 1)
        return out

    return flash_attn_varlen_func


def test_engine_flash_attn_arguments(monkeypatch):
    calls = []
    monkeypatch.setattr(kv_cache_module, "flash_attn_varlen_func", paged_varlen_twin(calls))
    model = tiny_model(seed=24, num_kv_heads=1)
    engine = make_engine(model, max_num_batched_tokens=12)
    engine.kv_cache.backend = "flash_attn"
    generate_and_check(engine, model)
    assert calls


def test_unknown_backend_is_a_clear_error():
    engine = make_engine(tiny_model())
    engine.kv_cache.backend = "flash"
    with pytest.raises(ValueError, match="KVCache.backend must be"):
        engine.generate(prompts_of([3]), SamplingParams(max_tokens=1))


def test_flash_attn_context_needs_key_lengths():
    engine = make_engine(tiny_model())
    engine.generate(prompts_of([3]), SamplingParams(max_tokens=1))
    engine.kv_cache.backend = "flash_attn"
    one = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        engine.kv_cache.context(slot_mapping=one.long(), cu_seqlens_q=torch.tensor([0, 1], dtype=torch.int32),
                                block_tables=one[None], seq_lens=one, max_seqlen_q=1)
