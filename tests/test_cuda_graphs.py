"""The CUDA-graph decode path's static, padded buffers, run eagerly on CPU (capture=False).

On CUDA the same buffers are captured once per bucket and replayed; what can go wrong without a GPU
is the padding: pad rows must not write the KV cache nor change any real row. So each test runs a
whole generation through the padded path and compares every sampled row's logits with the plain
eager engine (and with a full forward), with batch sizes that land between buckets, sequences
finishing mid-run (the batch shrinks), preemption and prefix sharing.
"""
import pytest
import torch
from engine_utils import tiny_model
from test_engine import assert_rows_match_full_forward, make_engine, prompts_of, record_logits

from cir.engine import SamplingParams
from cir.engine.cuda_graphs import DecodeGraphs, batch_buckets


def with_padded_graphs(engine, max_batch: int) -> DecodeGraphs:
    max_blocks = -(-engine.max_model_len // engine.config.block_size)
    engine.runner.graphs = DecodeGraphs(engine.model, engine.kv_cache, max_batch, max_blocks, capture=False)
    return engine.runner.graphs


def count_calls(graphs: DecodeGraphs) -> list[int]:
    sizes, run = [], graphs.run

    def spy(input_ids, *rest):
        sizes.append(len(input_ids))
        return run(input_ids, *rest)

    graphs.run = spy
    return sizes


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert batch_buckets(256)[-3:] == [224, 240, 256]
    graphs = DecodeGraphs(tiny_model(), make_engine(tiny_model()).kv_cache, 40, 8, capture=False)
    assert [graphs.bucket_for(b) for b in (1, 3, 5, 9, 17, 33, 40, 41)] == [1, 4, 8, 16, 32, 40, 40, None]


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_padded_decode_matches_eager_and_full_forward(num_kv_heads):
    model = tiny_model(seed=11, num_kv_heads=num_kv_heads)
    prompts = prompts_of([2, 5, 9, 14, 3], seed=12)  # 5 x 3 = 15 sequences: bucket 16, one pad row
    params = SamplingParams(temperature=1.0, max_tokens=12)  # EOS can end rows early: 15 -> fewer

    eager = make_engine(model, max_num_batched_tokens=24)
    seen_eager = record_logits(eager)
    expected = eager.generate(prompts, params, n=3)

    padded = make_engine(model, max_num_batched_tokens=24)
    sizes = count_calls(with_padded_graphs(padded, max_batch=16))
    seen = record_logits(padded)
    trajs = padded.generate(prompts, params, n=3)

    assert sizes and len(set(sizes)) > 1 and any(s not in batch_buckets(16) for s in sizes)
    assert [t.response_ids for t in trajs] == [t.response_ids for t in expected]
    assert len(seen) == len(seen_eager)
    worst = max((a[1] - b[1]).abs().max().item() for a, b in zip(seen, seen_eager, strict=True))
    assert worst < 1e-5, f"padded decode differs from eager by {worst:.2e}"
    assert_rows_match_full_forward(model, seen)


def test_padded_decode_under_preemption_and_prefix_sharing():
    model = tiny_model(seed=13)
    shared = prompts_of([9], seed=14)[0]
    prompts = [shared + tail for tail in prompts_of([3, 6, 2], seed=15)]
    engine = make_engine(model, num_kv_blocks=12, max_num_batched_tokens=32)
    sizes = count_calls(with_padded_graphs(engine, max_batch=8))
    seen = record_logits(engine)
    trajs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True), n=3)
    assert all(len(t.response_ids) == 14 for t in trajs)
    assert engine.stats["num_preemptions"] > 0 and sizes
    assert_rows_match_full_forward(model, seen)


def test_batches_above_the_largest_bucket_run_eagerly():
    model = tiny_model(seed=16)
    engine = make_engine(model)
    sizes = count_calls(with_padded_graphs(engine, max_batch=2))
    seen = record_logits(engine)
    engine.generate(prompts_of([3, 4, 5, 6], seed=17), SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True))
    assert sizes == [] or max(sizes) <= 2
    assert_rows_match_full_forward(model, seen)


def test_graphs_are_dropped_when_the_pool_or_the_parameters_move():
    model = tiny_model(seed=18)
    engine = make_engine(model)
    graphs = with_padded_graphs(engine, max_batch=4)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.generate(prompts_of([4]), params)
    graphs.graphs[1] = "captured"  # stands in for a CUDAGraph: check() must forget it when stale
    engine.generate(prompts_of([4]), params)  # same pool, same storage: kept
    assert graphs.graphs == {1: "captured"}

    engine.kv_cache.pool = engine.kv_cache.pool.clone()  # a pool at another address
    graphs.check()
    assert graphs.graphs == {}

    graphs.graphs[1] = "captured"
    engine.release()  # the pool's memory goes back: so do the graphs pointing into it
    assert graphs.graphs == {} and not engine.kv_cache.is_allocated

    engine.generate(prompts_of([4]), params)  # a new pool
    graphs.graphs[1] = "captured"
    with torch.no_grad():
        weight = model.layers[0].mlp.up_proj.weight
        weight.data = weight.data.clone()  # the parameter now lives elsewhere (as after an FSDP unshard)
    graphs.check()
    assert graphs.graphs == {}


def test_capture_needs_cuda():
    engine = make_engine(tiny_model())
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(engine.model, engine.kv_cache, 4, 8, capture=True)


def test_graph_path_through_the_triton_kernel():
    # what a CUDA replay computes, minus the capture: padded static buffers, a block table as wide as
    # max_model_len (the kernel's KV split count then comes from that width, its split lengths from
    # each sequence's own length), the Triton paged-attention kernel (interpreted here)
    model = tiny_model(seed=19, num_kv_heads=1, max_position_embeddings=2048)
    engine = make_engine(model, max_num_batched_tokens=24)
    engine.kv_cache.backend = "triton"
    graphs = with_padded_graphs(engine, max_batch=8)
    assert graphs.block_tables.shape[1] == 512  # 2048 positions / 4-token blocks
    sizes = count_calls(graphs)
    seen = record_logits(engine)
    engine.generate(prompts_of([3, 7, 12], seed=20), SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True),
                    n=2)
    assert sizes and 6 in sizes
    assert_rows_match_full_forward(model, seen)
