"""Nothing a snippet prints or raises, and no failure of the sandbox, stops a rollout silently: odd text
(a lone surrogate) becomes feedback, an executor that raises gives feedback and is counted as an
infrastructure failure, a killed sandbox server restarts, and calls that keep failing stop generate
with one error line. Scripted model + byte tokenizer (engine_utils), a real sandbox where it matters."""
import os
import signal
from types import SimpleNamespace
from concurrent.futures import Future

import pytest
from engine_utils import ByteTokenizer, ScriptedModel

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.tools import InfraFailures, SandboxFailingError, feedback_text, tool_outcome, valid_text
from cir.errors import UserError
from cir_sandbox import Result, Sandbox, format_feedback

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, timeout=5.0, warm_modules=()) as sb:
        yield sb


class Scripted:
    """An executor answering from a function of the code: a Result, or an exception to raise."""

    def __init__(self, answer):
        self.answer, self.calls = answer, 0

    def submit(self, code):
        self.calls += 1
        future = Future()
        out = self.answer(code)
        future.set_exception(out) if isinstance(out, BaseException) else future.set_result(out)
        return future


def answer_text(out) -> str:
    """The feedback an answer should give: the Result's formatted text, or the executor's error line."""
    if isinstance(out, BaseException):
        return f"SandboxError: {type(out).__name__}: {out}"
    return valid_text(format_feedback(out))


def rollout(scripts: dict[str, list], answer, limit: int = 32, executor=None) -> tuple[list, Engine]:
    """Each prompt's script of text pieces and ("code", source) blocks, the feedback of each block being
    what `answer(source)` should give; the model samples the script, the engine runs the code through
    `executor` (default: a Scripted(answer) executor)."""
    models = {}
    for prompt, pieces in scripts.items():
        ids = TOK.encode(prompt)
        for piece in pieces:
            if isinstance(piece, str):
                ids += TOK.encode(piece)
            else:
                ids += TOK.encode(f"```python\n{piece[1]}\n```") + TOK.encode(feedback_text(answer_text(
                    answer(piece[1]))))
        models[TOK.encode(prompt)[0] % 16] = ids + [TOK.eos_token_id]
    engine = Engine(ScriptedModel(models, TOK.eos_token_id), TOK,
                    EngineConfig(block_size=4, num_kv_blocks=512, show_progress=False))
    engine.infra_failures = InfraFailures(limit)
    tools = ToolConfig(executor=executor or Scripted(answer), max_calls=4)
    trajs = engine.generate([TOK.encode(p) for p in scripts], SamplingParams(temperature=0.0, max_tokens=400),
                            tools=tools)
    return trajs, engine


def fed_back(traj) -> str:
    return TOK.decode([t for t, m in zip(traj.response_ids, traj.loss_mask, strict=True) if m == 0])


def test_a_lone_surrogate_in_a_result_becomes_feedback(box):
    """The snippet of the report: its error line carries chr(0xD800), which no tokenizer can encode."""
    def answer(code):
        return Result("error", error_line="ValueError: \ud800") if "raise" in code else box.run(code)

    scripts = {"A: surrogate": [("code", "raise ValueError(chr(0xD800))"), " then ", ("code", "print(7)"), " ok"]}
    (traj,), _ = rollout(scripts, answer)
    assert traj.finish_reason == "eos" and traj.text.endswith(" ok")
    assert (traj.num_tool_calls, traj.num_tool_successes) == (2, 1)
    assert fed_back(traj) == feedback_text("ValueError: \ufffd") + feedback_text("7")


def test_the_real_snippet_raising_a_lone_surrogate(box):
    results = {}

    def answer(code):  # the real sandbox's answer, the same one each time the code is asked for
        return results.setdefault(code, box.run(code))

    (traj,), _ = rollout({"B: real": [("code", "raise ValueError(chr(0xD800))"), " after"]}, answer)
    assert traj.finish_reason == "eos" and traj.text.endswith(" after")
    assert "ValueError" in fed_back(traj)


def test_valid_text():
    assert valid_text("a\ud800b") == "a\ufffdb" and valid_text("żółw ✓") == "żółw ✓"
    assert valid_text(12) == "12" and valid_text(None) == "None"


def test_an_executor_that_raises_is_counted_and_the_sequence_goes_on(box):
    """It used to end the trajectory with finish_reason 'error', counted nowhere."""
    def answer(code):
        return RecursionError("maximum recursion depth exceeded") if "1 / 0" in code else box.run(code)

    scripts = {"C: fails": [("code", "1 / 0"), " next ", ("code", "print(3)"), " end"],
               "D: fine": [("code", "print(4)"), " done"]}
    (a, b), engine = rollout(scripts, answer)
    assert a.finish_reason == b.finish_reason == "eos" and a.text.endswith(" end") and b.text.endswith(" done")
    assert fed_back(a) == feedback_text("SandboxError: RecursionError: maximum recursion depth exceeded") + \
        feedback_text("3")
    assert (a.num_tool_calls, a.num_tool_successes) == (2, 1)
    assert engine.stats["num_tool_infra_failures"] == 1
    engine.generate([TOK.encode("D: fine")], SamplingParams(temperature=0.0, max_tokens=400),
                    tools=ToolConfig(executor=Scripted(answer)))
    assert engine.stats["num_tool_infra_failures"] == 0  # per rollout; a healthy one: 0


def test_a_killed_sandbox_server_restarts_and_no_call_fails(box):
    old = box.server_pid
    os.kill(old, signal.SIGKILL)
    (traj,), engine = rollout({"H: after": [("code", "print(6 * 7)"), " fine"]},
                              lambda code: Result("ok", stdout="42\n"), executor=box)  # the real call meets it
    assert fed_back(traj) == feedback_text("42") and traj.num_tool_successes == 1 and traj.text.endswith(" fine")
    assert engine.stats["num_tool_infra_failures"] == 0
    assert box.server_pid != old and box.num_restarts == 1


def test_calls_that_keep_failing_stop_the_rollout_in_one_line():
    outcome = tool_outcome(_raising(RuntimeError("sandbox server failed to start (exit code 1)")))
    assert outcome.infra and not outcome.ok
    failures = InfraFailures(limit=3)
    failures.record(outcome)
    failures.record(outcome)
    failures.record(tool_outcome(_done(Result("error", error_line="NameError: x"))))  # the code's own error
    failures.record(outcome)
    failures.record(outcome)
    with pytest.raises(SandboxFailingError) as info:
        failures.record(outcome)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert message.startswith("the sandbox failed 3 tool calls in a row (last: SandboxError: RuntimeError: "
                              "sandbox server failed to start (exit code 1))")
    assert failures.num == 5


def test_a_rollout_whose_calls_all_fail_raises():
    """In the engine: with the sandbox gone for good, generate stops instead of training on errors."""
    scripts = {f"{chr(65 + i)}: q": [("code", f"print({i})"), " x"] for i in range(6)}
    with pytest.raises(SandboxFailingError, match="failed 4 tool calls in a row"):
        rollout(scripts, lambda code: RuntimeError("the Sandbox is closed"), limit=4)


def test_a_malformed_result_is_feedback_not_a_crash():
    """An executor other than cir_sandbox (whose Result coerces its fields) handing back a result whose
    stdout is not text: the executor's fault, counted, and the rollout goes on."""
    outcome = tool_outcome(_done(SimpleNamespace(status="ok", stdout=None, stderr="", error_line="", note="")))
    assert outcome.infra and outcome.text == "SandboxError: malformed result (AttributeError)"


def _done(result) -> Future:
    future = Future()
    future.set_result(result)
    return future


def _raising(exc: BaseException) -> Future:
    future = Future()
    future.set_exception(exc)
    return future


def test_the_trainer_logs_infra_failures_per_step(tmp_path, box):
    """`tools/infra_failures` in metrics.jsonl: the step's count over ranks, 0 in a healthy run."""
    import json

    from test_signal import make_trainer

    trainer = make_trainer(tmp_path, "--rollout.tool_budget", "{0: 2}")
    trainer.sandbox.close()  # its own; the module's is already warm
    trainer.sandbox = box
    trainer.train()
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["tools/infra_failures"] == 0


def test_only_the_sandbox_can_report_an_infrastructure_failure():
    """A snippet can raise its own `SandboxError` or be killed with any error line: neither counts. Only
    `Result.infrastructure`, which the server and client set and no report from a child can, does."""
    forged = Result("killed", error_line="SandboxError: children fail to start")
    real = Result("killed", error_line="SandboxError: children fail to start", infrastructure=True)
    for result, infra in ((forged, False), (real, True)):
        future = Future()
        future.set_result(result)
        assert tool_outcome(future).infra is infra
