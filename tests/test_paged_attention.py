"""Paged attention: Triton kernel (interpreter) and torch reference vs a dense causal computation.

    pytest tests/test_paged_attention.py
"""
import math

import pytest
import torch

from cir_kernels.paged_attention import paged_attention, store_kv
from cir_kernels.paged_attention_reference import paged_attention_reference

TOLERANCE = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)
# name -> (q_lens, seq_lens): q_len 1 = decode, q_len < seq_len = prefill chunk after a cached prefix
CASES = {
    "decode": ([1, 1, 1], [1, 17, 40]),
    "prefill_chunks": ([5, 20], [37, 20]),
    "mixed": ([1, 7, 1, 3], [70, 30, 1, 3]),
}


def make_case(q_lens, seq_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random per-sequence K/V scattered into a NaN-filled cache through shuffled block ids."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs = len(seq_lens)
    blocks_per_seq = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    block_ids = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.full((num_seqs, max_blocks), -1, dtype=torch.int32)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = k_cache.clone()
    ks, vs = [], []
    for b, n in enumerate(seq_lens):
        ids = [block_ids.pop() for _ in range(blocks_per_seq[b])]
        block_tables[b, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = torch.tensor(ids, dtype=torch.int64)[pos // block_size] * block_size + pos % block_size
        store_kv(k, v, k_cache, v_cache, slots)
        ks.append(k)
        vs.append(v)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    args = (q, cu, k_cache, v_cache, block_tables, torch.tensor(seq_lens, dtype=torch.int32))
    return args, ks, vs


def dense_attention(q, cu, ks, vs, scale=None):
    """Obviously correct: per sequence, per query, softmax over keys 0..its position, float64."""
    num_q_heads, head_dim = q.shape[1:]
    scale = head_dim ** -0.5 if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        group = num_q_heads // k.shape[1]
        k = k.double().repeat_interleave(group, dim=1)  # (L, Hq, D)
        v = v.double().repeat_interleave(group, dim=1)
        q_b = q[cu[b] : cu[b + 1]].double()
        for i in range(q_b.shape[0]):
            pos = k.shape[0] - q_b.shape[0] + i
            scores = torch.einsum("hd,lhd->hl", q_b[i], k[: pos + 1]) * scale
            out[cu[b] + i] = torch.einsum("hl,lhd->hd", scores.softmax(-1), v[: pos + 1])
    return out


def assert_close(actual, expected, dtype):
    atol, rtol = TOLERANCE[dtype]
    err = (actual.double() - expected).abs()
    assert actual.dtype == dtype
    assert torch.allclose(actual.double(), expected, atol=atol, rtol=rtol), (
        f"max abs err {err.max():.3g}, mean {err.mean():.3g} (atol {atol}, rtol {rtol})")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads,head_dim", [((4, 4), 64), ((8, 2), 48)], ids=["mha_d64", "gqa4_d48"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_dense(case, heads, head_dim, dtype, backend):
    q_lens, seq_lens = CASES[case]
    args, ks, vs = make_case(q_lens, seq_lens, *heads, head_dim, block_size=16, dtype=dtype)
    out = paged_attention(*args, backend=backend)
    assert_close(out, dense_attention(args[0], args[1].tolist(), ks, vs), dtype)


@pytest.mark.parametrize("num_splits", [2, 3])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_long_context_kv_splits_odd_block_size(backend, num_splits):
    """Several BLOCK_N steps per split, forced flash-decoding splits, block size 5, GQA 4, scale. 129
    keys over 2 splits: ceil(129 / 2) = 65 rounds up to 128 keys a split (BLOCK_N 64); a split length
    rounded down (64) would drop the last key."""
    args, ks, vs = make_case([1, 2, 1, 1], [150, 140, 9, 129], 4, 1, 16, block_size=5, dtype=torch.float32)
    out = paged_attention(*args, scale=0.3, max_seqlen_q=2, backend=backend, num_splits=num_splits)
    assert_close(out, dense_attention(args[0], args[1].tolist(), ks, vs, scale=0.3), torch.float32)


def test_strided_q_and_default_splits():
    """q as a view into a fused qkv projection; splits chosen by the launcher heuristic."""
    args, ks, vs = make_case([1, 1], [300, 33], 2, 2, 16, block_size=16, dtype=torch.float32)
    q = args[0]
    fused = torch.cat([q, torch.zeros_like(q)], dim=1)  # (T, 2 * Hq, D)
    q_view = fused[:, : q.shape[1]]
    assert not q_view.is_contiguous()
    out = paged_attention(q_view, *args[1:], backend="triton")
    assert_close(out, dense_attention(q, args[1].tolist(), ks, vs), torch.float32)


@pytest.mark.parametrize("case", list(CASES))
def test_reference_non_contiguous_sdpa_output_and_strided_q(case, monkeypatch):
    """CUDA's flash / efficient SDPA backends return (n, H, M, D) laid out as (n, M, H, D): not
    contiguous. The reference must accept that layout (a `.view` of it raised on CUDA with fp32), and
    a q that is a strided view of a fused qkv projection. CPU SDPA returns contiguous tensors, so
    the CUDA layout is imposed by a wrapper with the same values."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def sdpa_cuda_layout(*args, **kwargs):
        out = sdpa(*args, **kwargs)
        return out.transpose(1, 2).contiguous().transpose(1, 2)  # same values, heads innermost

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa_cuda_layout)
    q_lens, seq_lens = CASES[case]
    args, ks, vs = make_case(q_lens, seq_lens, 8, 2, 16, block_size=16, dtype=torch.float32)
    q = args[0]
    q_view = torch.cat([q, torch.zeros_like(q)], dim=1)[:, : q.shape[1]]  # (T, Hq, D), strided
    assert not q_view.is_contiguous()
    out = paged_attention_reference(q_view, *args[1:])
    assert_close(out, dense_attention(q, args[1].tolist(), ks, vs), torch.float32)


def test_reference_matches_triton_bf16_mixed():
    args, _, _ = make_case([1, 4, 1], [33, 20, 64], 8, 2, 32, block_size=16, dtype=torch.bfloat16)
    ref = paged_attention_reference(*args)
    out = paged_attention(*args, backend="triton", num_splits=2)  # bf16 through the combine step
    assert (out.float() - ref.float()).abs().max() < 2e-2


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_store_kv(backend):
    k_cache = torch.zeros(3, 4, 2, 8)
    v_cache = torch.zeros(3, 4, 2, 8)
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    store_kv(k, v, k_cache, v_cache, torch.tensor([9, -1, 2, 0]), backend=backend)
    assert torch.equal(k_cache[2, 1], k[0]) and torch.equal(v_cache[2, 1], v[0])
    assert torch.equal(k_cache[0, 2], k[2]) and torch.equal(v_cache[0, 2], v[2])
    assert torch.equal(k_cache[0, 0], k[3]) and torch.equal(v_cache[0, 0], v[3])  # slot 0 is a slot
    assert k_cache.count_nonzero() == 3 * 2 * 8  # the -1 slot wrote nothing


def _good_args():
    args, _, _ = make_case([1, 2], [5, 6], 4, 2, 16, block_size=4, dtype=torch.float32)
    return list(args)


@pytest.mark.parametrize("index,bad,match", [
    (0, lambda a: a[0].float()[:, :3], "not a multiple"),                    # Hq % Hkv
    (0, lambda a: a[0].to(torch.float64), "q dtype"),
    (0, lambda a: a[0][..., :8], "head_dim"),
    (0, lambda a: a[0].transpose(1, 2).contiguous().transpose(1, 2), "last dim"),
    (1, lambda a: a[1].long(), "cu_seqlens_q must be int32"),
    (1, lambda a: a[1][:-1], "cu_seqlens_q has"),
    (2, lambda a: a[2].bfloat16(), "k_cache dtype"),
    (2, lambda a: a[2].transpose(0, 1).contiguous().transpose(0, 1), "k_cache must be contig"),
    (3, lambda a: a[3][..., :8].contiguous(), "v_cache shape"),
    (4, lambda a: a[4].long(), "block_tables must be int32"),
    (4, lambda a: a[4][:1], "block_tables has"),
    (5, lambda a: a[5].long(), "seq_lens must be int32"),
])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_validation(index, bad, match, backend):
    args = _good_args()
    args[index] = bad(args)
    with pytest.raises(ValueError, match=match):
        paged_attention(*args, backend=backend)


def test_validation_backend_and_lengths():
    args = _good_args()
    with pytest.raises(ValueError, match="backend"):
        paged_attention(*args, backend="cuda")
    args[5] = torch.tensor([5, 1], dtype=torch.int32)  # 2 queries, 1 cached token
    with pytest.raises(ValueError, match="q_len 2"):
        paged_attention_reference(*args)
    with pytest.raises(ValueError, match="slot_mapping"):
        store_kv(torch.zeros(2, 2, 16), torch.zeros(2, 2, 16), args[2], args[3],
                 torch.zeros(2, dtype=torch.int32))
