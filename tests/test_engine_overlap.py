"""The overlapped decode loop: step t + 1 is launched before step t's tokens are read on the host, so
EOS and closed code blocks are seen one step late. References: the scripted model's token lists
(what each trajectory must be), the plain-Python seed hash, one-token-at-a-time detokenisation."""
import random

from engine_utils import ByteTokenizer, ScriptedModel
from test_engine_stress import EchoExecutor

import cir.engine.engine as engine_module
import cir.engine.scheduler as scheduler_module
from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.model_runner import sequence_seed, sequence_seeds
from cir.engine.sequence import Sequence
from cir.engine.tools import SegmentDecoder, feedback_text, fence_token_table
from cir_sandbox import format_feedback

TOK = ByteTokenizer()
EOS = TOK.eos_token_id


def scripted_engine(scripts: dict[str, str | list[int]], **config) -> tuple[Engine, list[list[int]], dict]:
    """Prompt "<letter>: ..." follows its script (text, or token ids with any feedback), then EOS."""
    models = {TOK.encode(p)[0] % 16: TOK.encode(p) + (TOK.encode(r) if isinstance(r, str) else r) + [EOS]
              for p, r in scripts.items()}
    engine = Engine(ScriptedModel(models, EOS), TOK,
                    EngineConfig(**{"block_size": 4, "num_kv_blocks": 64, "show_progress": False, **config}))
    return engine, [TOK.encode(p) for p in scripts], models


def spy_steps(engine: Engine) -> list[dict[Sequence, int]]:
    """The sequences of each launched step (what the model computed) and their lengths at launch
    (a token sampled by the previous step and not read yet counts)."""
    steps, forward = [], engine.runner.forward

    def spy(batch, ctx):
        steps.append({seq: len(seq.token_ids) for seq in batch.seqs})
        return forward(batch, ctx)

    engine.runner.forward = spy
    return steps


def spy_block_manager(monkeypatch) -> list:
    made, cls = [], engine_module.BlockManager

    def make(*args, **kwargs):
        made.append(cls(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(engine_module, "BlockManager", make)
    return made


def test_a_sequence_ending_at_step_t_gets_no_token_from_step_t_plus_1(monkeypatch):
    engine, prompts, models = scripted_engine({"A: x": "ab", "B: y": "a much longer answer"})
    steps = spy_steps(engine)
    managers = spy_block_manager(monkeypatch)
    finished = {}
    finish = scheduler_module.Scheduler.finish

    def on_finish(scheduler, seq, reason):
        finish(scheduler, seq, reason)
        finished[seq.group_id] = (len(steps), list(seq.block_table), seq.num_cached_tokens)

    monkeypatch.setattr(scheduler_module.Scheduler, "finish", on_finish)
    trajs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=100))
    a, b = trajs
    assert a.prompt_ids + a.response_ids == models[TOK.encode("A")[0] % 16]  # ends at its EOS, nothing after
    assert b.prompt_ids + b.response_ids == models[TOK.encode("B")[0] % 16]
    assert a.finish_reason == b.finish_reason == "eos"
    (a_seq,) = {s for step in steps for s in step if s.group_id == 0}
    step_of_eos, blocks, cached = finished[0]
    # the EOS sampled at step t is read while step t + 1 runs: A was computed once more (with its EOS
    # as input), the token it got there dropped
    assert steps[step_of_eos - 1][a_seq] == len(models[TOK.encode("A")[0] % 16])
    assert all(a_seq not in step for step in steps[step_of_eos:])
    assert blocks == [] and cached == 0  # its blocks went back when its EOS was read
    (bm,) = managers
    assert bm.num_free_blocks == len(bm.blocks)


def test_length_limit_is_known_without_the_token():
    # the last token's position is known in advance: no extra step, nothing computed past max_model_len
    engine, prompts, _ = scripted_engine({"C: z": "x" * 40}, max_model_len=20)
    positions, forward_hidden = [], engine.model.forward_hidden

    def spy(input_ids, pos, ctx):
        positions.append(int(pos.max()))
        return forward_hidden(input_ids, pos, ctx)

    engine.model.forward_hidden = spy
    steps = spy_steps(engine)
    (traj,) = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=100))
    assert traj.finish_reason == "length" and len(traj.prompt_ids) + len(traj.response_ids) == 20
    assert max(positions) == 18  # the 20th token is sampled from position 18 and never computed
    assert len(steps) == 1 + len(traj.response_ids) - 1  # prefill, then one step per further token


def test_a_closed_code_block_pauses_one_step_late_and_the_extra_token_is_dropped():
    code = "print(7)"
    fence_end = TOK.encode(f"go ```python\n{code}\n```")
    feedback = TOK.encode(feedback_text(format_feedback(EchoExecutor.result(code))))
    script = fence_end + feedback + TOK.encode(" after")
    engine, prompts, _ = scripted_engine({"D: t": script, "E: u": "plain text only, no tools"})
    steps = spy_steps(engine)
    submitted, executor = [], EchoExecutor()

    class Recorder:
        def submit(self, code):
            submitted.append(len(steps))
            return executor.submit(code)

    trajs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=200),
                            tools=ToolConfig(executor=Recorder(), max_calls=1))
    d = trajs[0]
    assert d.response_ids == fence_end + feedback + TOK.encode(" after") + [EOS]
    assert d.loss_mask == [1] * len(fence_end) + [0] * len(feedback) + [1] * (len(" after") + 1)
    (step,) = submitted  # the fence sampled at step t, submitted while step t + 1 ran (D in it, the fence
    d_seq = next(s for s in steps[step - 1] if s.group_id == 0)  # its input)
    assert steps[step - 1][d_seq] == len(prompts[0]) + len(fence_end)


def test_vectorised_seeds_equal_the_per_draw_hash():
    rng = random.Random(0)
    for _ in range(5):
        call_seed = rng.randrange(2**62)
        seqs = []
        for _ in range(50):
            seq = Sequence(list(range(rng.randint(1, 9))), SamplingParams(), group_id=0,
                           sample_idx=rng.randrange(64), seed_key=rng.randrange(2**40))
            seq.token_ids += [0] * rng.randrange(5000)
            seqs.append(seq)
        expected = [sequence_seed(call_seed, s) for s in seqs]
        got = sequence_seeds(call_seed, [s.seed_key for s in seqs], [s.sample_idx for s in seqs],
                             [s.num_response_tokens for s in seqs])
        assert got.tolist() == expected


def test_fence_table_and_batched_detokenisation():
    table = fence_token_table(TOK)
    assert table.shape == (TOK.vocab_size + 1,) and table[-1]
    assert set(table[:-1].nonzero()[0].tolist()) == {ord("`")}
    rng = random.Random(1)
    text = "é ```python\nprint('ü€')\n``` ok 𝛑 "
    ids = TOK.encode(text) + [rng.randrange(256) for _ in range(40)]  # valid and broken UTF-8
    one, batched = SegmentDecoder(TOK), SegmentDecoder(TOK)
    for i in ids:
        one.push(i)
    i = 0
    while i < len(ids):
        n = rng.randint(1, 7)
        batched.extend(ids[i : i + n])
        i += n
    assert batched.text == one.text and batched.is_holding_back == one.is_holding_back



class SplitCharTokenizer(ByteTokenizer):
    """Bytes, EOS 256, and two tokens that split one character: 257 = b"``\\xe2", 258 = b"\\x82\\xac"
    ("``€" together): the fence's last backticks come with half a character, held back until 258."""

    vocab_size = 259
    EXTRA = {257: b"``\xe2", 258: b"\x82\xac"}

    def decode(self, ids: list[int]) -> str:
        data = b"".join(self.EXTRA.get(i, bytes([i]) if i < 256 else b"") for i in ids)
        return data.decode("utf-8", errors="replace")


def test_a_fence_hidden_behind_half_a_character_is_found_at_the_token_that_completes_it():
    tok = SplitCharTokenizer()
    prompt = tok.encode("H: s")
    feedback = tok.encode(feedback_text(format_feedback(EchoExecutor.result("print(3)\n"))))
    fence = tok.encode("```python\nprint(3)\n`") + [257, 258]  # the block closes at 258, not at 257
    script = prompt + fence + feedback + tok.encode("done") + [EOS]
    engine = Engine(ScriptedModel({prompt[0] % 16: script}, EOS, vocab_size=tok.vocab_size), tok,
                    EngineConfig(block_size=4, num_kv_blocks=64, show_progress=False))
    (traj,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=200),
                              tools=ToolConfig(executor=EchoExecutor(), max_calls=1))
    assert traj.response_ids == script[len(prompt):]
    assert traj.num_tool_calls == 1 and traj.finish_reason == "eos"
