"""Engine against independent references: a full forward over the whole sequence, repeated full
forwards for greedy decoding, the training forward + linear_logprobs for behaviour log-probs."""
import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.engine import Engine, EngineConfig, SamplingParams
from cir_kernels import linear_logprobs


def make_engine(model, **config) -> Engine:
    config.setdefault("block_size", 4)
    config.setdefault("num_kv_blocks", 256)
    config.setdefault("show_progress", False)
    return Engine(model, ByteTokenizer(), EngineConfig(**config))


def record_logits(engine: Engine) -> list[tuple[list[int], torch.Tensor]]:
    """Every sampled row of every step: (the tokens the row saw, its logits). The last of those tokens
    may be read back only after the step (a placeholder then): the row keeps its sequence and length,
    resolved into tokens when the list is read, after generate."""
    seen, forward = _Rows(), engine.runner.forward

    def spy(batch, ctx):
        owners, logits = forward(batch, ctx)
        seen.extend((seq, len(seq.token_ids), row.clone()) for seq, row in zip(owners, logits, strict=True))
        return owners, logits

    engine.runner.forward = spy
    return seen


class _Rows(list):
    def __iter__(self):
        return ((seq.token_ids[:n], row) for seq, n, row in super().__iter__())


def full_forward_last(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0, -1].float()


def prompts_of(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def assert_rows_match_full_forward(model, seen):
    assert seen
    worst = max((full_forward_last(model, ids) - row).abs().max().item() for ids, row in seen)
    assert worst < 1e-4, f"paged logits differ from a full forward by {worst:.2e}"


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_paged_step_logits_equal_full_forward(num_kv_heads):
    # prompt lengths cross the 4-token blocks mid-prompt; 3 samples share each prompt's blocks;
    # a 24-token step budget chunks the longer prompts
    model = tiny_model(num_kv_heads=num_kv_heads)
    engine = make_engine(model, max_num_batched_tokens=24)
    seen = record_logits(engine)
    trajs = engine.generate(prompts_of([1, 5, 16, 17, 38]), SamplingParams(temperature=1.0, max_tokens=10), n=3)
    assert len(trajs) == 15 and all(len(t.response_ids) > 0 for t in trajs)
    assert_rows_match_full_forward(model, seen)


def test_prefix_sharing_across_prompts_and_preemption_keep_logits_exact():
    model = tiny_model(seed=1)
    shared = prompts_of([13])[0]
    prompts = [shared + tail for tail in prompts_of([3, 6, 9, 2], seed=2)]
    # 14 blocks x 4 tokens cannot hold 4 x 3 sequences of ~30 tokens: preemption must happen
    engine = make_engine(model, num_kv_blocks=14, max_num_batched_tokens=32)
    seen = record_logits(engine)
    trajs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True), n=3)
    assert all(len(t.response_ids) == 14 and t.finish_reason == "length" for t in trajs)
    assert engine.stats["num_preemptions"] > 0
    assert engine.stats["num_prefix_cache_hit_tokens"] > 0
    assert_rows_match_full_forward(model, seen)


def greedy_by_full_forward(model, prompt: list[int], num_tokens: int) -> list[int]:
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(full_forward_last(model, ids).argmax()))
    return ids[len(prompt):]


def test_greedy_equals_repeated_full_forward():
    model = tiny_model(seed=3)
    prompts = prompts_of([3, 9, 21], seed=4)
    trajs = make_engine(model).generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    for prompt, traj in zip(prompts, trajs, strict=True):
        assert traj.response_ids == greedy_by_full_forward(model, prompt, 16)


def test_engine_uses_model_storage_and_sees_optimizer_steps_without_sync():
    model = tiny_model(seed=5)
    engine = make_engine(model)
    assert engine.runner.model is model
    pointers = {p.data_ptr() for p in model.parameters()}
    prompt = prompts_of([7], seed=6)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    before = engine.generate(prompt, params)[0].response_ids

    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = model(torch.tensor(prompt)).logsumexp(-1).mean() - model(torch.tensor(prompt))[0, -1, before[0]]
    loss.backward()
    opt.step()
    assert {p.data_ptr() for p in model.parameters()} == pointers  # updated in place

    after = engine.generate(prompt, params)[0].response_ids
    assert after == greedy_by_full_forward(model, prompt[0], 12)
    assert after != before


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_behaviour_logprobs_equal_training_forward(temperature):
    model = tiny_model(seed=7)
    trajs = make_engine(model).generate(prompts_of([4, 11], seed=8),
                                        SamplingParams(temperature=temperature, max_tokens=12), n=2)
    for traj in trajs:
        ids = traj.prompt_ids + traj.response_ids
        cu = torch.tensor([0, len(ids)], dtype=torch.int32)
        with torch.no_grad():
            hidden = model.forward_packed(torch.tensor(ids), cu)  # (T, D)
        start = len(traj.prompt_ids) - 1  # hidden at t predicts token t + 1
        rows = hidden[start : start + len(traj.response_ids)]
        targets = torch.tensor(traj.response_ids)
        recomputed = linear_logprobs(rows, model.lm_head_weight, targets, temperature=temperature)
        diff = (recomputed - torch.tensor(traj.logprobs)).abs().max().item()
        assert diff < 1e-4, f"behaviour vs training log-probs differ by {diff:.2e}"


def test_release_and_reallocate_pool():
    model = tiny_model(seed=9)
    engine = make_engine(model, release_after_generate=True)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    first = engine.generate(prompts_of([5]), params)
    assert not engine.kv_cache.is_allocated
    assert engine.generate(prompts_of([5]), params)[0].response_ids == first[0].response_ids


def test_bad_requests_are_clear_errors():
    engine = make_engine(tiny_model())
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.generate([[1] * 600], SamplingParams())
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RuntimeError, match="cannot hold one sequence"):
        make_engine(tiny_model(), num_kv_blocks=2).generate(prompts_of([20]), SamplingParams(max_tokens=4))


def test_smollm2_engine_greedy_equals_transformers(smollm2_dir):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    from cir.model import from_pretrained
    from cir.tokenizer import load_tokenizer

    tok = load_tokenizer(smollm2_dir)
    model = from_pretrained(smollm2_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 12 * 7? Use python."}])
    prompt = tok.encode(text)
    engine = Engine(model, tok, EngineConfig(num_kv_blocks=64, show_progress=False))
    ours = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True))[0]
    ref = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours.response_ids == out[0, len(prompt):].tolist()


def test_generation_under_bf16_autocast_keeps_a_bf16_cache():
    # the GPU recipe: fp32 weights, bf16 math for rollout and training (checked here on CPU autocast)
    model = tiny_model(seed=10)
    engine = make_engine(model)
    params = SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trajs = engine.generate(prompts_of([5, 9]), params, n=2)
    assert engine.kv_cache.dtype == torch.bfloat16
    assert all(len(t.response_ids) == 6 and all(lp <= 0 for lp in t.logprobs) for t in trajs)
    engine.generate(prompts_of([5]), params)  # back to fp32: the pool is reallocated
    assert engine.kv_cache.dtype == torch.float32


def test_sampled_tokens_do_not_depend_on_scheduling():
    # each draw is seeded by (generate call, prompt, sample, position): a tiny pool (preemption),
    # a small step budget (chunked prefill) or a different batch make no difference to the tokens
    model = tiny_model(seed=11)
    prompts = prompts_of([6, 13, 3, 21], seed=12)
    params = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    roomy = make_engine(model, seed=5).generate(prompts, params, n=3)
    tight_engine = make_engine(model, seed=5, num_kv_blocks=10, max_num_batched_tokens=8)
    tight = tight_engine.generate(prompts, params, n=3)
    assert tight_engine.stats["num_preemptions"] > 0
    assert [t.response_ids for t in tight] == [t.response_ids for t in roomy]
    alone = make_engine(model, seed=5).generate(prompts[:1], params, n=3)
    assert [t.response_ids for t in alone] == [t.response_ids for t in roomy[:3]]
    other_seed = make_engine(model, seed=6).generate(prompts, params, n=3)
    assert [t.response_ids for t in other_seed] != [t.response_ids for t in roomy]
