"""Code-integrated rollouts with a scripted model and a real sandbox: token in, token out."""
import time
from concurrent.futures import Future

import pytest
from engine_utils import ByteTokenizer, ScriptedModel

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine import scheduler as scheduler_module
from cir.engine.tools import feedback_text, find_closed_code
from cir_sandbox import Sandbox, format_feedback

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=4, timeout=5.0, warm_modules=()) as sb:
        yield sb


def block(code: str) -> str:
    return f"```python\n{code}\n```"


def expected_trajectory(box, prompt: str, pieces: list, max_calls: int) -> tuple[list[int], list[int]]:
    """The tokens a correct engine produces for a script of text pieces and code blocks, and the mask.

    `pieces`: str (sampled text) or ("code", source) (a sampled code block; run while budget lasts).
    """
    ids, mask, calls = TOK.encode(prompt), [], 0
    for piece in pieces:
        if isinstance(piece, str):
            text = TOK.encode(piece)
            ids += text
            mask += [1] * len(text)
            continue
        text = TOK.encode(block(piece[1]))
        ids += text
        mask += [1] * len(text)
        if calls < max_calls:
            calls += 1
            fb = TOK.encode(feedback_text(format_feedback(box.run(piece[1]))))
            ids += fb
            mask += [0] * len(fb)
    return ids, mask


def run_scripts(box, scripts: dict[str, list], max_calls: int = 2, max_tokens: int = 400, executor=None,
                engine_kw: dict | None = None, n: int = 1, **tool_kw):
    """Prompt "<letter>: ..." selects a script (key = first byte % 16)."""
    expected, models = {}, {}
    for prompt, pieces in scripts.items():
        ids, mask = expected_trajectory(box, prompt, pieces, max_calls)
        expected[prompt] = (ids, mask)
        models[TOK.encode(prompt)[0] % 16] = ids + [TOK.eos_token_id]
    engine = Engine(ScriptedModel(models, TOK.eos_token_id), TOK,
                    EngineConfig(**{"block_size": 4, "num_kv_blocks": 512, "show_progress": False,
                                    **(engine_kw or {})}))
    finished = []
    finish = scheduler_module.Scheduler.finish

    def spy(scheduler, seq, reason):
        finished.append(seq.group_id)
        finish(scheduler, seq, reason)

    scheduler_module.Scheduler.finish = spy
    tools = ToolConfig(executor=executor or box, max_calls=max_calls, **tool_kw)
    prompts = [TOK.encode(p) for p in scripts]
    try:
        trajs = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), n=n, tools=tools)
    finally:
        scheduler_module.Scheduler.finish = finish
    return trajs, expected, finished


def test_response_is_sampled_ids_with_feedback_ids_inserted(box):
    scripts = {
        "A: add": ["Let me compute.\n", ("code", "print(1 + 1)"), "So \\boxed{2}."],
        "B: err": ["Try: ", ("code", "1 / 0"), " then ", ("code", "print('ok')"), " done."],
    }
    trajs, expected, _ = run_scripts(box, scripts)
    for traj, prompt in zip(trajs, scripts, strict=True):
        ids, mask = expected[prompt]
        assert traj.prompt_ids + traj.response_ids == ids + [TOK.eos_token_id]
        assert traj.loss_mask == mask + [1]
        assert all(lp == 0.0 for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m == 0)
        assert traj.finish_reason == "eos"
    a, b = trajs
    assert (a.num_tool_calls, a.num_tool_successes) == (1, 1)
    assert (b.num_tool_calls, b.num_tool_successes) == (2, 1)
    fb = [t for t, m in zip(a.response_ids, a.loss_mask, strict=True) if m == 0]
    assert TOK.decode(fb) == feedback_text("2")
    assert "ZeroDivisionError" in b.text


def test_budget_spent_continues_without_running_code(box):
    scripts = {"C: three": [("code", "print(1)"), ("code", "print(2)"), ("code", "print(3)"), " end"]}
    trajs, expected, _ = run_scripts(box, scripts, max_calls=2)
    (traj,) = trajs
    assert traj.num_tool_calls == 2 and traj.finish_reason == "eos"
    assert traj.prompt_ids + traj.response_ids == expected["C: three"][0] + [TOK.eos_token_id]
    assert "```output\n3" not in traj.text


def test_budget_spent_can_stop(box):
    scripts = {"D: two": [("code", "print(1)"), ("code", "print(2)"), " never"]}
    (traj,), _, _ = run_scripts(box, scripts, max_calls=1, on_budget_spent="stop")
    assert traj.finish_reason == "budget" and traj.num_tool_calls == 1
    assert traj.text.endswith(block("print(2)"))


def test_unclosed_code_block_at_length_limit_is_not_run(box):
    scripts = {"E: open": ["```python\nprint('never run')\n" + "x = 1\n" * 20]}
    (traj,), _, _ = run_scripts(box, scripts, max_tokens=40)
    assert traj.finish_reason == "length" and traj.num_tool_calls == 0
    assert len(traj.response_ids) == 40 and all(m == 1 for m in traj.loss_mask)


def test_length_limit_counts_feedback_tokens(box):
    code = "print('x' * 300)"
    scripts = {"F: long": [("code", code), "after"]}
    limit = len(TOK.encode(block(code))) + 10
    (traj,), _, _ = run_scripts(box, scripts, max_tokens=limit)
    assert len(traj.response_ids) == limit and traj.finish_reason == "length"
    assert traj.loss_mask[-1] == 0


def test_slow_code_does_not_hold_back_other_sequences(box):
    scripts = {
        "G: slow": [("code", "import time\ntime.sleep(2)\nprint(5)"), "slow done"],
        "H: fast": ["quick ", ("code", "print(6)"), "fast done"],
        "I: plain": ["no tools here at all"],
    }
    start = time.monotonic()
    trajs, expected, finished = run_scripts(box, scripts)
    assert time.monotonic() - start >= 2.0
    assert finished[-1] == 0, f"finish order by prompt index: {finished}"
    for traj, prompt in zip(trajs, scripts, strict=True):
        assert traj.prompt_ids + traj.response_ids == expected[prompt][0] + [TOK.eos_token_id]


def test_find_closed_code():
    text = "text ```python\nx = 1\nprint(x)\n```"
    assert find_closed_code(text) == ("x = 1\nprint(x)\n", len(text))
    assert find_closed_code("```python\nx = 1\n") is None
    assert find_closed_code("```py") is None
    assert find_closed_code("a ```python\nprint(1)\n``` b ```python\nprint(2)\n```", 24)[0] == "print(2)\n"


class Immediate:
    """Runs each snippet in the real sandbox but hands back an already completed future, so results
    are ready at the engine's very next poll (the timing a fast sandbox gives)."""

    def __init__(self, box):
        self.box = box

    def submit(self, code):
        future = Future()
        future.set_result(self.box.run(code))
        return future


def test_feedback_ending_the_last_sequence_ends_generation(box):
    code = "print('x' * 300)"
    scripts = {"J: last": [("code", code), "never"]}
    limit = len(TOK.encode(block(code))) + 10
    (traj,), _, _ = run_scripts(box, scripts, max_tokens=limit, executor=Immediate(box))
    assert traj.finish_reason == "length" and len(traj.response_ids) == limit
