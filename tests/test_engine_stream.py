"""Rollout streams (rollout.mode: partial; cir/engine/stream.py): calls that return the first groups
to finish and carry the rest. References: the scripted model's token lists (what each trajectory must
be, feedback included), a full forward of the model version that sampled each token (its behaviour
log-prob), the call index (each token's version)."""
import copy
from concurrent.futures import Future

import torch
from engine_utils import ByteTokenizer, ScriptedModel, tiny_model
from test_engine_stress import EchoExecutor

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.stream import RolloutStream
from cir.engine.tools import SegmentDecoder, feedback_text
from cir_kernels import linear_logprobs
from cir_sandbox import format_feedback

TOK = ByteTokenizer()
EOS = TOK.eos_token_id


class HeldExecutor(EchoExecutor):
    """Answers only when `release()` is called: a sandbox call in flight across a call boundary."""

    def __init__(self):
        self.held: list[tuple[Future, str]] = []

    def submit(self, code):
        future = Future()
        self.held.append((future, code))
        return future

    def release(self):
        for future, code in self.held:
            future.set_result(self.result(code))
        self.held = []


def scripted_stream(num_prompts: int, n: int, **config):
    """Prompts of 16 different scripts (key = first byte % 16), lengths 3..60 tokens, some with a tool call."""
    scripts, prompts, expected = {}, [], {}
    for i in range(num_prompts):
        prompt = TOK.encode(chr(ord("A") + i) + ": q")
        body = TOK.encode("x" * (3 + 19 * i % 57))
        if i % 3 == 0:
            code = f"print({i})"
            block = TOK.encode(f"```python\n{code}\n```")
            fb = TOK.encode(feedback_text(format_feedback(EchoExecutor.result(code))))
            ids, mask = body + block + fb + TOK.encode("ok"), [1] * (len(body) + len(block)) + [0] * len(fb) + [1, 1]
        else:
            ids, mask = body, [1] * len(body)
        scripts[prompt[0] % 16] = prompt + ids + [EOS]
        expected[i] = (ids + [EOS], mask + [1])
        prompts.append((prompt, i))
    engine = Engine(ScriptedModel(scripts, EOS), TOK,
                    EngineConfig(**{"block_size": 4, "num_kv_blocks": 256, "show_progress": False, **config}))
    return engine, prompts, expected


def test_groups_come_back_whole_and_exact_across_calls_with_a_sandbox_call_in_flight():
    engine, prompts, expected = scripted_stream(12, n=2, max_num_seqs=6)
    stream = RolloutStream(iter(prompts), SamplingParams(temperature=0.0, max_tokens=200), n=2, max_staleness=None)
    executor = HeldExecutor()
    tools = ToolConfig(executor=executor, max_calls=1)
    seen, carried_paused = [], 0
    for version in range(40):
        groups = engine.generate_stream(stream, num_groups=2, tools=tools, version=version)
        carried_paused += sum(s.status.name == "TOOL" for g in stream.groups for s in g)
        executor.release()  # the sandbox answers between calls: those sequences resume in the next one
        seen += groups
        if not groups and not stream.has_unfinished:
            break
    assert carried_paused > 0  # some sequence was waiting on the sandbox at a call's end
    assert sorted(g[0].prompt_index for g in seen) == list(range(12))
    for group in seen:
        assert [t.sample_index for t in group] == [0, 1]
        for traj in group:
            ids, mask = expected[traj.prompt_index]
            assert traj.response_ids == ids and traj.loss_mask == mask
            assert traj.num_tool_calls == (traj.prompt_index % 3 == 0) and traj.finish_reason == "eos"
            assert len(traj.versions) == len(ids) and traj.versions == sorted(traj.versions)


def test_carried_tokens_keep_the_log_probs_and_versions_of_the_weights_that_sampled_them():
    model = tiny_model(seed=3)
    engine = Engine(model, TOK, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=4, show_progress=False))
    g = torch.Generator().manual_seed(0)
    prompts = [(torch.randint(0, 256, (int(k),), generator=g).tolist(), i) for i, k in enumerate([3, 9, 5, 7, 4, 6])]
    # stop ids on ~1 token in 10: response lengths vary, so groups finish at different steps
    params = SamplingParams(temperature=1.0, max_tokens=40, stop_token_ids=list(range(0, 256, 10)))
    stream = RolloutStream(iter(prompts), params, n=2, max_staleness=1)
    versions = [copy.deepcopy(model)]
    out = engine.generate_stream(stream, num_groups=1, version=0)
    with torch.no_grad():  # an optimizer step, in place
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    versions.append(copy.deepcopy(model))
    out += engine.generate_stream(stream, num_groups=2, version=1)
    carried = [t for group in out for t in group if set(t.versions) == {0, 1}]
    assert carried, "no trajectory spans the weight change"
    for traj in (t for group in out for t in group):
        ids = traj.prompt_ids + traj.response_ids
        for v in set(traj.versions):
            with torch.no_grad():
                hidden = versions[v].forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)], dtype=torch.int32))
            start = len(traj.prompt_ids) - 1
            recomputed = linear_logprobs(hidden[start : start + len(traj.response_ids)], versions[v].lm_head_weight,
                                         torch.tensor(traj.response_ids))
            mine = torch.tensor([i for i, tv in enumerate(traj.versions) if tv == v])
            diff = (recomputed[mine] - torch.tensor(traj.logprobs)[mine]).abs().max().item()
            assert diff < 1e-4, f"version {v} tokens: behaviour log-probs off by {diff:.2e}"


def test_the_staleness_bound_restarts_older_sequences():
    engine, prompts, expected = scripted_stream(12, n=1, max_num_seqs=4)
    stream = RolloutStream(iter(prompts), SamplingParams(temperature=0.0, max_tokens=200), n=1, max_staleness=0)
    seen = []
    for version in range(60):
        groups = engine.generate_stream(stream, num_groups=1, tools=ToolConfig(EchoExecutor(), max_calls=1),
                                        version=version)
        for (traj,) in groups:
            assert set(traj.versions) == {version}  # nothing older than the bound: all from this call
            assert traj.response_ids == expected[traj.prompt_index][0]
        seen += groups
        if not groups and not stream.has_unfinished:
            break
    assert stream.num_restarted > 0 and len(seen) == 12


def test_the_running_batch_stays_full():
    engine, prompts, _ = scripted_stream(16, n=2, max_num_seqs=8)
    stream = RolloutStream(iter(prompts * 4), SamplingParams(temperature=0.0, max_tokens=200), n=2)
    engine.generate_stream(stream, num_groups=1, tools=ToolConfig(EchoExecutor(), max_calls=1), version=0)
    engine.generate_stream(stream, num_groups=4, tools=ToolConfig(EchoExecutor(), max_calls=1), version=1)
    assert stream.stats["num_carried_in"] > 0 and stream.stats["occupancy"] > 0.7


def _roll(engine, stream, tools, versions, executor=None) -> list:
    out = []
    for version in versions:
        out += [[(t.prompt_index, t.sample_index, t.response_ids, t.loss_mask, t.logprobs, t.versions,
                  t.num_tool_calls, t.finish_reason) for t in g]
                for g in engine.generate_stream(stream, num_groups=2, tools=tools, version=version)]
        if executor is not None:
            executor.release()
    return out


def test_a_stream_saved_between_calls_continues_as_the_uninterrupted_one():
    """Carried sequences (one paused at the sandbox with its call in flight) survive state_dict ->
    torch.save -> load_state_dict into a fresh engine and stream: the next calls return what the
    uninterrupted stream returns, log-probs and versions included."""
    import io
    import threading

    engine, prompts, _ = scripted_stream(12, n=2, max_num_seqs=6)
    params = SamplingParams(temperature=0.0, max_tokens=200)
    executor = HeldExecutor()
    tools = ToolConfig(executor=executor, max_calls=1)
    stream = RolloutStream(iter(prompts), params, n=2, max_staleness=None)
    for version in range(2):
        engine.generate_stream(stream, num_groups=2, tools=tools, version=version)
    in_flight = [s for s in stream.futures if not stream.futures[s].done()]
    assert in_flight and stream.has_unfinished
    threading.Timer(0.2, executor.release).start()  # the sandbox answers while the state waits for it
    buffer = io.BytesIO()
    torch.save(stream.state_dict(), buffer)
    generator = engine.runner.generator.get_state()
    expected = _roll(engine, stream, tools, range(2, 8), executor)

    engine2, _, _ = scripted_stream(12, n=2, max_num_seqs=6)
    engine2.runner.generator.set_state(generator)
    restored = RolloutStream(iter(prompts[stream_taken(buffer):]), params, n=2, max_staleness=None)
    buffer.seek(0)
    restored.load_state_dict(torch.load(buffer, weights_only=False), new_decoder=lambda: SegmentDecoder(TOK))
    executor2 = HeldExecutor()
    got = _roll(engine2, restored, ToolConfig(executor=executor2, max_calls=1), range(2, 8), executor2)
    assert got == expected and any(len(set(t[5])) > 1 for g in got for t in g)  # some span two versions


def stream_taken(buffer) -> int:
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)["num_groups_taken"]


def test_a_sampled_stream_saved_between_calls_draws_the_same_tokens():
    """Temperature 1 on a random model: the restored sequences keep their seed bases, so the draws match."""
    import io

    def make():
        torch.manual_seed(0)
        return Engine(tiny_model(seed=3), TOK, EngineConfig(block_size=4, num_kv_blocks=256, max_num_seqs=4,
                                                             show_progress=False))
    g = torch.Generator().manual_seed(0)
    lengths = [3, 9, 5, 7, 4, 6] * 2
    prompts = [(torch.randint(0, 256, (int(k),), generator=g).tolist(), i) for i, k in enumerate(lengths)]
    params = SamplingParams(temperature=1.0, max_tokens=40, stop_token_ids=list(range(0, 256, 10)))
    engine, stream = make(), RolloutStream(iter(prompts), params, n=2, max_staleness=1)
    engine.generate_stream(stream, num_groups=1, version=0)
    assert stream.has_unfinished
    buffer = io.BytesIO()
    torch.save({"stream": stream.state_dict(), "generator": engine.runner.generator.get_state()}, buffer)
    expected = _roll(engine, stream, None, range(1, 4))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    engine2 = make()
    engine2.runner.generator.set_state(saved["generator"])
    restored = RolloutStream(iter(prompts[saved["stream"]["num_groups_taken"]:]), params, n=2, max_staleness=1)
    restored.load_state_dict(saved["stream"])
    assert _roll(engine2, restored, None, range(1, 4)) == expected
