"""It learns: the embedded default's recipe, CI-sized. RL raises accuracy and tool use on a task a
tiny model cannot do without the tool.

Task: multiply two 2-digit numbers. A model of 100k parameters cannot multiply, but it can copy:
the operands into `print(a*b)`, and the interpreter's output into \\boxed{}. The project's warm start
(`Trainer.warm_start`, cir/rl/warm_start.py: synthetic traces, a quarter that call the real sandbox,
three quarters that answer directly) leaves a policy that reaches for the tool now and then. The
real trainer (engine rollouts, real sandbox calls, rewards, REINFORCE++ updates on the same weights,
no-signal groups filtered) must then push tool use and accuracy well above where they started; the
assertion is on the metric curve, not on a step count.
"""
import json
import random

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.config import load_config
from cir.data.arithmetic import Exercise
from cir.data.problems import Problem
from cir.rl.trainer import Trainer
from cir_sandbox import Sandbox


def multiplications(num: int, seed: int) -> list[Exercise]:
    rng = random.Random(seed)
    out = []
    for i in range(num):
        a, b = rng.randint(32, 99), rng.randint(32, 99)  # the product always has 4 digits
        out.append(Exercise(Problem(f"Q: {a}*{b}", str(a * b), id=str(i)), f"print({a}*{b})"))
    return out


@pytest.mark.slow
def test_rl_raises_accuracy_and_tool_use(tmp_path):
    data = tmp_path / "mul.jsonl"
    data.write_text("\n".join(json.dumps({"problem": e.problem.problem, "answer": e.problem.answer, "id": e.problem.id})
                              for e in multiplications(64, seed=1)))
    with Sandbox(workers=2, timeout=5.0, warm_modules=()) as box:
        model = tiny_model(seed=0, num_kv_heads=4, hidden_size=96, intermediate_size=192, head_dim=24)
        with torch.no_grad():  # back to a trainable scale after tiny_model's large test init
            for p in model.parameters():
                p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
        config = load_config(None, [
            "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "30",
            "--train.prompts_per_step", "16", "--train.save_every", "0", "--train.micro_batch_tokens", "4096",
            "--rollout.n", "8", "--rollout.max_response_tokens", "64", "--rollout.prompt_mode", "plain",
            "--rollout.tool_budget", "{0: 1}", "--optim.lr", "1e-3", "--rl.mini_batches", "1",
            "--train.warm_start_tool_fraction", "0.25", "--train.warm_start_lr", "3e-3",
            "--train.warm_start_epochs", "10", "--train.warm_start_batch", "32",
            "--engine.num_kv_blocks", "2048", "--engine.block_size", "16", "--engine.show_progress", "false",
        ])
        trainer = Trainer(config, sandbox=box, model=model, tokenizer=ByteTokenizer())
        warm = trainer.warm_start(multiplications(960, seed=2))  # 300 supervised steps
        assert warm["warm_start/loss_last"] < 0.6 * warm["warm_start/loss_first"]
        curve = []
        for _ in range(config.train.steps):
            m = trainer.train_step()
            curve.append((m["accuracy"], m["tools/responses_using_tool"], m["train/grad_norm"],
                          m["signal/groups_with_signal"]))
            if len(curve) >= 4 and sum(a for a, *_ in curve[-3:]) / 3 > curve[0][0] + 0.35:
                break
    start_acc, start_tool = curve[0][:2]
    end_acc = sum(a for a, *_ in curve[-3:]) / 3
    end_tool = sum(t for _, t, *_ in curve[-3:]) / 3
    assert start_tool < 0.6, f"warm start should leave room to learn: {curve[0]}"
    assert end_acc > start_acc + 0.3, f"accuracy did not rise: {curve}"
    assert end_tool > start_tool + 0.3, f"tool use did not rise: {curve}"
    assert all(g > 0 for *_, g, s in curve if s > 0), f"a step with signal computed no gradient: {curve}"
