"""The warm start: synthetic problems, trace format (real sandbox output, feedback masked), and the
supervised loss against a plain full forward."""
import json

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.data import arithmetic
from cir.data.problems import default_problems_path, load_problems
from cir.data.prompts import build_prompt
from cir.rl.policy import PolicyForward
from cir.rl.warm_start import SEED_OFFSET, build_traces, supervised_steps
from cir_sandbox import Sandbox

TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def box():
    with Sandbox(workers=2, timeout=5.0, warm_modules=()) as sandbox:
        yield sandbox


def test_embedded_set_is_the_generator_output_and_answers_are_right():
    problems = load_problems(default_problems_path())
    assert [(p.id, p.problem, p.answer) for p in problems] == \
        [(p.id, p.problem, p.answer) for p in arithmetic.embedded_problems()]
    for ex in arithmetic.exercises(60, seed=arithmetic.EMBEDDED_SEED):
        assert ex.code.startswith("print(") and ex.code.endswith(")")
        assert str(eval(ex.code[len("print("):-1])) == ex.problem.answer  # the program answers the problem
        assert int(ex.problem.answer) >= 0
    kinds = [next(k for k in ("times", "squared", "remainder") if k in p.problem) for p in problems]
    assert {k: kinds.count(k) for k in set(kinds)} == {"times": 80, "squared": 80, "remainder": 80}


def test_exercises_exclude_given_problems():
    run = {p.problem for p in arithmetic.embedded_problems()}
    warm = {e.problem.problem for e in arithmetic.exercises(512, seed=0 + SEED_OFFSET, exclude=run)}
    assert len(warm) == 512 and not run & warm


def test_exercises_are_reproducible_and_checked():
    assert arithmetic.exercises(9, seed=3) == arithmetic.exercises(9, seed=3)
    assert arithmetic.exercises(9, seed=3) != arithmetic.exercises(9, seed=4)
    assert [e.problem.id for e in arithmetic.exercises(3, 1, prefix="w")] == ["w-0001", "w-0002", "w-0003"]
    with pytest.raises(ValueError, match="kinds"):
        arithmetic.exercises(3, 1, kinds=("division",))


def test_traces_carry_the_sandbox_output_masked(box):
    exercises = arithmetic.exercises(20, seed=5)
    traces = build_traces(exercises, TOK, box, "plain", tool_fraction=0.25, seed=1)
    assert sum(t.uses_tool for t in traces) == 5  # exactly round(0.25 * 20)
    for ex, t in zip(exercises, traces, strict=True):
        assert t.prompt_ids == TOK.encode(build_prompt(ex.problem, mode="plain"))
        assert len(t.loss_mask) == len(t.response_ids) == len(t.logprobs)
        assert t.response_ids[-1] == TOK.eos_token_id and t.loss_mask[-1] == 1
        text = TOK.decode(t.response_ids)
        if not t.uses_tool:
            assert text == f"\\boxed{{{ex.problem.answer}}}" and all(t.loss_mask)
            continue
        feedback = f"\n```output\n{ex.problem.answer}\n```\n"  # what the sandbox printed, the paper's block
        assert text == f"```python\n{ex.code}\n```" + feedback + f"\\boxed{{{ex.problem.answer}}}"
        masked = bytes(i for i, m in zip(t.response_ids, t.loss_mask, strict=True) if m == 0).decode()
        assert masked == feedback  # loss mask 0 exactly on the output block


def test_traces_need_an_executor_for_tool_traces():
    exercises = arithmetic.exercises(4, seed=5)
    assert not any(t.uses_tool for t in build_traces(exercises, TOK, None, "plain", tool_fraction=0.0))
    with pytest.raises(ValueError, match="executor"):
        build_traces(exercises, TOK, None, "plain", tool_fraction=0.5)
    with pytest.raises(ValueError, match="tool_fraction"):
        build_traces(exercises, TOK, None, "plain", tool_fraction=1.5)


def reference_nll(model, traces) -> torch.Tensor:
    """Mean NLL of the masked-in response tokens from the plain (B, T) forward, one trace at a time."""
    total, count = 0.0, 0
    for t in traces:
        ids = torch.tensor([t.prompt_ids + t.response_ids])
        logp = torch.log_softmax(model(ids)[0].double(), dim=-1)  # (T, V)
        p = len(t.prompt_ids)
        for i, (target, m) in enumerate(zip(t.response_ids, t.loss_mask, strict=True)):
            if m:
                total -= logp[p - 1 + i, target]
                count += 1
    return total / count


def test_supervised_loss_matches_a_full_forward_and_falls(box):
    traces = build_traces(arithmetic.exercises(12, seed=2), TOK, box, "plain", tool_fraction=0.5, seed=0)
    model = tiny_model(seed=0)
    with torch.no_grad():
        expected = float(reference_nll(model, traces))
    # one batch of all traces split over several micro-batches: the first loss is the reference NLL
    losses = supervised_steps(PolicyForward(model), traces, lr=3e-3, epochs=30, batch_size=len(traces),
                              micro_batch_tokens=200, seed=0)
    # float32 sums over ~400 tokens of log-softmax over 257 entries: about 1e-6 relative
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # the model itself learned (the last reported loss was before the last step)
        assert float(reference_nll(model, traces)) < 0.5 * losses[0]


def small_run_config(tmp_path, num_problems: int, *overrides: str):
    """One RL step on the first `num_problems` embedded problems (the last 2 held out), tiny rollouts."""
    from cir.config import load_config

    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": p.problem, "answer": p.answer})
                              for p in arithmetic.embedded_problems()[:num_problems]))
    return load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "1",
        "--train.prompts_per_step", "2", "--rollout.n", "2", "--rollout.max_response_tokens", "8",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 1}", "--train.save_every", "0",
        "--engine.num_kv_blocks", "64", "--engine.show_progress", "false", "--train.held_out", "2", *overrides,
    ])


def test_warm_start_through_the_trainer(tmp_path, box):
    from cir.rl.trainer import Trainer

    cfg = small_run_config(tmp_path, 12, "--train.warm_start", "16", "--train.warm_start_batch", "8")
    model = tiny_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model=model, tokenizer=TOK, sandbox=box)
    assert [p.problem for p in trainer.held_out] == [p.problem for p in arithmetic.embedded_problems()[10:12]]
    stats = trainer.warm_start()
    assert stats["warm_start/traces"] == 16 and stats["warm_start/steps"] == 2
    assert stats["warm_start/tool_fraction"] == pytest.approx(round(0.3 * 16) / 16)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not trainer.optimizer.state  # the RL optimizer starts clean
    evals = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert evals[0]["warm_start"]["warm_start/traces"] == 16


def test_held_out_must_leave_problems_to_train_on(tmp_path):
    from cir.config import load_config
    from cir.rl.trainer import Trainer

    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}+1", "answer": str(i + 1)}) for i in range(3)))
    cfg = load_config(None, ["--train.data", str(data), "--train.output_dir", str(tmp_path / "run"),
                             "--rollout.tool_budget", "{0: 0}", "--train.held_out", "3"])
    with pytest.raises(ValueError, match="train.held_out = 3"):
        Trainer(cfg, model=tiny_model(seed=0), tokenizer=TOK)


def test_warm_start_config_is_checked():
    from cir.config import load_config

    with pytest.raises(ValueError, match="warm_start_tool_fraction"):
        load_config(None, ["--train.warm_start_tool_fraction", "1.2"])
    with pytest.raises(ValueError, match="held_out"):
        load_config(None, ["--train.held_out", "-1"])


def test_default_config_fits_its_traces(smollm2_dir, box):
    """configs/default.yaml: a warm-start trace (code, output block, boxed answer) fits the response
    limit, else every tool answer would be cut and score -1."""
    from pathlib import Path

    from cir.config import load_config
    from cir.tokenizer import load_tokenizer

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml"))
    assert cfg.train.warm_start > 0 and cfg.train.held_out > 0 and cfg.rl.filter_groups
    tok = load_tokenizer(smollm2_dir)
    exercises = arithmetic.exercises(90, seed=SEED_OFFSET)  # 30 of each kind
    traces = build_traces(exercises, tok, box, cfg.rollout.prompt_mode, tool_fraction=1.0)
    assert max(len(t.response_ids) for t in traces) <= cfg.rollout.max_response_tokens
    assert max(len(t.prompt_ids) for t in traces) <= cfg.rollout.max_prompt_tokens


def test_train_warm_starts_then_evaluates_held_out_before_and_after(tmp_path, box, capsys):
    from cir.rl.trainer import Trainer

    cfg = small_run_config(tmp_path, 6, "--train.warm_start", "8")
    Trainer(cfg, model=tiny_model(seed=0), tokenizer=TOK, sandbox=box).train()
    out = capsys.readouterr().out
    assert "warm start: 8 synthetic traces (30% with the interpreter)" in out
    before, after = out.index("held-out before RL (2 problems x 2): accuracy"), out.index("held-out after RL")
    assert before < out.index("step 1:") < after
    assert "held-out (2 problems x 2): accuracy 0.000 -> 0.000" in out  # random weights: never right
    evals = [json.loads(line) for line in open(tmp_path / "run" / "eval.jsonl")]
    assert [(e["step"], e.get("when")) for e in evals] == [(0, None), (0, "before RL"), (1, "after RL")]
    assert evals[1]["held_out"]["num_problems"] == 2
