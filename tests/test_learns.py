"""It learns: RL raises accuracy and tool use on a task a tiny model cannot do without the tool.

Task: multiply two 2-digit numbers. A model of 100k parameters cannot multiply, but it can copy:
the operands into `print(a*b)`, and the interpreter's output into \\boxed{}. A short supervised
warm start on synthetic traces - a quarter that call the tool, three quarters that guess - leaves
a policy that reaches for the tool now and then. The real trainer (engine rollouts, real sandbox
calls, rewards, REINFORCE++ updates on the same weights) must then push tool use and accuracy well
above where they started; the assertion is on the metric curve, not on a fixed number of steps.
"""
import json
import random

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.config import load_config
from cir.engine.tools import feedback_text
from cir.rl.trainer import Trainer
from kernels import linear_logprobs
from sandbox import Sandbox, format_feedback

TOK = ByteTokenizer()


def problem(rng: random.Random) -> tuple[str, int, int]:
    a, b = rng.randint(32, 99), rng.randint(32, 99)  # the product always has 4 digits
    return f"Q: {a}*{b}\n", a, b


def warm_start(model, box, steps: int = 300, seed: int = 0) -> None:
    """Supervised traces, loss on sampled tokens only (feedback masked), as in RL."""
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ids, rows, targets, cu = [], [], [], [0]
        for _ in range(32):
            prompt, a, b = problem(rng)
            if rng.random() < 0.25:
                code = f"print({a}*{b})"
                fb = feedback_text(format_feedback(box.run(code)))
                parts = [(f"```python\n{code}\n```", 1), (fb, 0), (f"\\boxed{{{a * b}}}", 1)]
            else:
                parts = [(f"\\boxed{{{rng.randint(1000, 9999)}}}", 1)]
            seq = TOK.encode(prompt)
            mask = []
            for text, m in parts:
                seq += TOK.encode(text)
                mask += [m] * len(TOK.encode(text))
            seq.append(TOK.eos_token_id)
            mask.append(1)
            start = cu[-1]
            p = len(TOK.encode(prompt))
            rows += [start + p - 1 + i for i, m in enumerate(mask) if m]
            targets += [t for t, m in zip(seq[p:], mask) if m]
            ids += seq
            cu.append(start + len(seq))
        hidden = model.forward_packed(torch.tensor(ids), torch.tensor(cu, dtype=torch.int32))
        logprobs = linear_logprobs(hidden[torch.tensor(rows)], model.lm_head_weight, torch.tensor(targets))
        loss = -logprobs.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.slow
def test_rl_raises_accuracy_and_tool_use(tmp_path):
    rng = random.Random(1)
    data = tmp_path / "mul.jsonl"
    with open(data, "w") as f:
        for i in range(64):
            prompt, a, b = problem(rng)
            f.write(json.dumps({"problem": prompt.removesuffix("\n"), "answer": str(a * b), "id": str(i)}) + "\n")
    with Sandbox(workers=2, timeout=5.0, warm_modules=()) as box:
        model = tiny_model(seed=0, num_kv_heads=4, hidden_size=96, intermediate_size=192, head_dim=24)
        with torch.no_grad():  # back to a trainable scale after tiny_model's large test init
            for p in model.parameters():
                p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
        warm_start(model, box)
        config = load_config(None, [
            "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "30",
            "--train.prompts_per_step", "16", "--train.save_every", "0", "--train.micro_batch_tokens", "4096",
            "--rollout.n", "8", "--rollout.max_response_tokens", "64", "--rollout.prompt_mode", "plain",
            "--rollout.tool_budget", "{0: 1}", "--optim.lr", "1e-3", "--rl.mini_batches", "1",
            "--engine.num_kv_blocks", "2048", "--engine.block_size", "16", "--engine.show_progress", "false",
        ])
        trainer = Trainer(config, sandbox=box, model=model, tokenizer=TOK)
        curve = []
        for _ in range(config.train.steps):
            metrics = trainer.train_step()
            curve.append((metrics["accuracy"], metrics["tools/responses_using_tool"]))
            if len(curve) >= 4 and sum(a for a, _ in curve[-3:]) / 3 > curve[0][0] + 0.35:
                break
    start_acc, start_tool = curve[0]
    end_acc = sum(a for a, _ in curve[-3:]) / 3
    end_tool = sum(t for _, t in curve[-3:]) / 3
    assert start_tool < 0.6, f"warm start should leave room to learn: {curve[0]}"
    assert end_acc > start_acc + 0.3, f"accuracy did not rise: {curve}"
    assert end_tool > start_tool + 0.3, f"tool use did not rise: {curve}"
