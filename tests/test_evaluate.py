"""Evaluation: the metric math on hand-computed cases, the command's options, and one tiny end-to-end
run of `evaluate` (random model, byte tokenizer, no tools) and of the trainer's `evaluate_problems`."""
import concurrent.futures as cf
import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from engine_utils import ByteTokenizer, ScriptedModel, tiny_model

from cir.data.problems import Problem
from cir.data.prompts import build_prompt
from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.tools import feedback_text
from cir.eval_metrics import pass_at_k
from cir.eval import evaluate, summarize
from cir.evaluate import _parse_args, _unique_names, format_table
from cir.rl.budget import ToolBudget
from cir.rl.evaluation import evaluate_problems
from cir_sandbox.result import Result, format_feedback


def record(rewards, calls, successes, finish, predictions=None, lengths=None) -> dict:
    n = len(rewards)
    return {"id": "p", "answer": "1", "rewards": rewards, "num_correct": sum(r > 0 for r in rewards),
            "num_tool_calls": calls, "num_tool_successes": successes, "finish_reasons": finish,
            "predictions": predictions or ["1"] * n, "num_response_tokens": lengths or [10] * n}


def test_pass_at_k_hand_computed():
    # 1 - C(n - c, k) / C(n, k)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(16, 3, 4) == pytest.approx(1 - math.comb(13, 4) / math.comb(16, 4))
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)  # pass@1 is the fraction correct
    assert pass_at_k(8, 0, 8) == 0.0 and pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(4, 3, 2) == 1.0  # fewer than k wrong samples: any k contain a correct one


def test_summarize_hand_computed():
    records = [
        record([-1, 1, -1, -1], calls=[0, 1, 2, 0], successes=[0, 1, 1, 0], finish=["eos", "eos", "length", "eos"],
               predictions=[None, "1", "2", "3"], lengths=[10, 20, 30, 40]),
        record([1, 1, 1, 1], calls=[1, 0, 0, 0], successes=[0, 0, 0, 0], finish=["eos"] * 4),
    ]
    summary = summarize(records, n=4)
    m = summary["metrics"]
    assert m["num_problems"] == 2 and m["n"] == 4
    assert m["avg@4"] == pytest.approx((1 / 4 + 1) / 2)
    assert summary["pass_at_k"] == pytest.approx([(0.25 + 1) / 2, (0.5 + 1) / 2, (0.75 + 1) / 2, 1.0])
    assert m["pass@4"] == 1.0
    assert m["tools/calls_per_response"] == pytest.approx(4 / 8)
    assert m["tools/success_rate"] == pytest.approx(2 / 4)
    assert m["tools/responses_using_tool"] == pytest.approx(3 / 8)
    assert m["answer/boxed_rate"] == pytest.approx(7 / 8)
    assert m["response/length_mean"] == pytest.approx((100 + 40) / 8)
    assert m["finish/eos"] == pytest.approx(7 / 8) and m["finish/length"] == pytest.approx(1 / 8)


def test_summarize_rejects_bad_input():
    with pytest.raises(ValueError, match="no problems"):
        summarize([], n=4)
    with pytest.raises(ValueError, match="expected 4 responses"):
        summarize([record([1, -1], [0, 0], [0, 0], ["eos", "eos"])], n=4)


def test_table_and_names():
    records = [record([1, -1], [0, 1], [0, 1], ["eos", "length"])]
    table = format_table({"aime24": summarize(records, 2), "amc23": summarize(records, 2)})
    assert "aime24" in table and "amc23" in table and "pass@2" in table and "average" in table
    assert _unique_names(["a/test.jsonl", "b/test.jsonl", "c.jsonl"]) == ["test", "test-2", "c"]


def test_command_defaults_are_the_papers():
    args = _parse_args(["--data", "x.jsonl"])
    assert (args.n, args.temperature, args.top_p, args.max_new_tokens, args.max_tool_calls) == (16, 1.0, 0.95, 16384, 5)
    assert args.prompt_mode == "chat"  # the embedded default model is an instruct model
    assert _parse_args(["--data", "x.jsonl", "--model", "m"]).prompt_mode == "raw"
    greedy = _parse_args(["--data", "x.jsonl", "--greedy"])
    assert (greedy.n, greedy.temperature) == (1, 0.0)
    with pytest.raises(SystemExit):
        _parse_args(["--data", "x.jsonl", "--greedy", "--n", "16"])


PROBLEMS = [Problem(problem="1+1?", answer="2", id="a"), Problem(problem="2+3?", answer="5", id="b"),
            Problem(problem="3*3?", answer="9", id="c")]


def make_engine(seed: int = 0) -> Engine:
    return Engine(tiny_model(), ByteTokenizer(),
                  EngineConfig(block_size=16, num_kv_blocks=256, show_progress=False, seed=seed))


def test_evaluate_end_to_end_tiny_model():
    engine = make_engine()
    n = 2
    out = evaluate(engine, engine.tokenizer, PROBLEMS, n, SamplingParams(temperature=1.0, max_tokens=6), tools=None)
    m, records = out["metrics"], out["records"]
    assert m["num_problems"] == 3 and m["n"] == n
    assert m["avg@2"] == 0.0 and out["pass_at_k"] == [0.0, 0.0]  # random weights: every answer is wrong
    assert m["tools/calls_per_response"] == 0.0
    assert sum(v for k, v in m.items() if k.startswith("finish/")) == pytest.approx(1.0)
    assert m["time/generate"] > 0
    assert [r["id"] for r in records] == ["a", "b", "c"]
    for r, p in zip(records, PROBLEMS, strict=True):
        assert r["answer"] == p.answer and r["num_correct"] == 0
        assert r["rewards"] == [-1.0] * n
        for key in ("responses", "predictions", "num_tool_calls", "num_tool_successes", "finish_reasons",
                    "num_response_tokens"):
            assert len(r[key]) == n, key
        assert all(1 <= length <= 6 for length in r["num_response_tokens"])


def test_evaluate_problems_for_the_trainer_restores_the_sampling_generator():
    engine = make_engine()
    rollout = SimpleNamespace(n=2, temperature=1.0, top_p=1.0, max_response_tokens=4, prompt_mode="raw",
                              max_prompt_tokens=500, on_budget_spent="continue")
    trainer = SimpleNamespace(config=SimpleNamespace(rollout=rollout), engine=engine, tokenizer=engine.tokenizer,
                              sandbox=None, model=engine.model, policy=engine.model, step=3,
                              budget=ToolBudget.parse({0: 2}), _autocast=contextlib.nullcontext)
    engine.model.train()
    before = engine.runner.generator.get_state()
    metrics = evaluate_problems(trainer, PROBLEMS[:2])
    assert torch.equal(engine.runner.generator.get_state(), before)
    assert engine.model.training
    assert metrics["num_problems"] == 2 and metrics["avg@2"] == 0.0 and "records" not in metrics


class PrintsFour:
    """An executor whose every call prints "4"."""

    def submit(self, code: str) -> cf.Future:
        future = cf.Future()
        future.set_result(Result(status="ok", stdout="4\n"))
        return future


def test_evaluate_counts_tool_calls_and_correct_answers():
    tok = ByteTokenizer()
    problem = Problem(problem="2+2?", answer="4", id="four")
    prompt = tok.encode(build_prompt(problem, mode="raw"))
    response = (tok.encode("```python\nprint(2+2)\n```")
                + tok.encode(feedback_text(format_feedback(Result("ok", "4\n"))))
                + tok.encode("So \\boxed{4}."))
    model = ScriptedModel({prompt[0] % 16: prompt + response + [tok.eos_token_id]}, tok.eos_token_id)
    engine = Engine(model, tok, EngineConfig(block_size=16, num_kv_blocks=128, show_progress=False))
    out = evaluate(engine, tok, [problem], 2, SamplingParams(temperature=0.0, max_tokens=200),
                   tools=ToolConfig(PrintsFour(), max_calls=2))
    m, (r,) = out["metrics"], out["records"]
    assert m["avg@2"] == 1.0 and out["pass_at_k"] == [1.0, 1.0]
    assert m["tools/calls_per_response"] == 1.0 and m["tools/success_rate"] == 1.0
    assert m["tools/responses_using_tool"] == 1.0 and m["finish/eos"] == 1.0
    assert r["predictions"] == ["4", "4"] and r["rewards"] == [1.0, 1.0] and r["num_tool_calls"] == [1, 1]
    assert r["responses"][0].endswith("So \\boxed{4}.")
