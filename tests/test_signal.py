"""No silent no-op steps: a step whose groups all have equal rewards is reported (metrics, a warning
naming the likely cause) and, with rl.filter_groups (the default), skips the update."""
import json

import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.config import load_config
from cir.rl.signal import no_signal_cause
from cir.rl.trainer import Trainer


def counts(**kw) -> dict:
    base = dict(groups=4, groups_with_signal=0, responses=16, correct=0, boxed=16, tool_calls=8, tool_outputs=8,
                truncated=0)
    return {k: float(v) for k, v in {**base, **kw}.items()}


def test_causes_in_words():
    assert "no response had a correct \\boxed{} answer" in no_signal_cause(counts(), 256, tools_on=True)
    cut = no_signal_cause(counts(truncated=16, boxed=0), 48, tools_on=True)
    assert "rollout.max_response_tokens = 48" in cut and "too short" in cut and "\\boxed{} answer at all" in cut
    assert "75%" in no_signal_cause(counts(truncated=12), 48, tools_on=True)
    assert "no tool output" in no_signal_cause(counts(tool_calls=0, tool_outputs=0), 256, tools_on=True)
    assert "no tool output" in no_signal_cause(counts(tool_outputs=0), 256, tools_on=True)
    assert "tool" not in no_signal_cause(counts(tool_calls=0, tool_outputs=0), 256, tools_on=False)
    assert "too easy" in no_signal_cause(counts(correct=16), 256, tools_on=True)
    assert "rollout.n" in no_signal_cause(counts(correct=8), 256, tools_on=True)


def make_trainer(tmp_path, *extra: str) -> Trainer:
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}+{i}", "answer": str(2 * i)}) for i in range(4)))
    cfg = load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "1",
        "--train.prompts_per_step", "2", "--rollout.n", "3", "--rollout.max_response_tokens", "6",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "0",
        "--engine.num_kv_blocks", "64", "--engine.show_progress", "false", "--optim.lr", "1e-3", *extra,
    ])
    return Trainer(cfg, model=tiny_model(seed=0), tokenizer=ByteTokenizer())


def params(trainer) -> dict:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_equal_rewards_skip_the_update(tmp_path):
    trainer = make_trainer(tmp_path)
    trajs, _, _ = trainer.rollout(next(trainer.loader))
    before = params(trainer)
    for equal in (torch.full((2, 3), -1.0), torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])):
        stats = trainer.update(trajs, equal)
        assert stats["skipped"] == 1.0 and stats["grad_norm"] == 0.0 and stats["num_loss_tokens"] == 0
        assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
        assert not trainer.optimizer.state  # no optimizer step at all (AdamW would move on momentum alone)
    stats = trainer.update(trajs, torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]))  # one group differs
    assert stats["skipped"] == 0.0 and stats["grad_norm"] > 0
    assert stats["num_loss_tokens"] == sum(sum(t.loss_mask) for t in trajs[:3])  # only the group with signal
    assert any(not torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_no_signal_step_is_reported(tmp_path, capsys):
    trainer = make_trainer(tmp_path)  # random weights, 6-token responses: nothing is ever right
    before = params(trainer)
    trainer.train()
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["signal/groups_with_signal"] == 0 and row["signal/groups"] == 2 and row["train/skipped"] == 1.0
    assert "warning: step 1: no learning signal, all 2 groups have equal rewards" in out
    assert "no response had a correct \\boxed{} answer" in out
    assert "max_response_tokens = 6" in out  # every response hit the 6-token limit
    assert "update skipped" in out and "signal 0/2 (no signal: update skipped)" in out  # the progress line
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_without_filtering_the_step_runs_and_still_warns(tmp_path, capsys):
    trainer = make_trainer(tmp_path, "--rl.filter_groups", "false", "--rl.kl_coef", "0.1")
    trainer.train()
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["train/skipped"] == 0.0 and row["train/num_loss_tokens"] > 0  # the KL term still trains
    assert "no learning signal" in out and "zero-advantage update (rl.filter_groups off)" in out


def test_a_step_whose_prompts_were_all_skipped_says_so(tmp_path, capsys):
    """Every prompt longer than rollout.max_prompt_tokens: 0 groups, 0 responses. That used to read as
    0 correct of 0 responses, "every response was correct"."""
    assert "too easy" not in no_signal_cause(counts(groups=0, responses=0, prompts_skipped=2), 6, True, 4)
    trainer = make_trainer(tmp_path, "--rollout.max_prompt_tokens", "2")
    trainer.train()
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["signal/groups"] == 0 and row["signal/prompts_skipped"] == 2 and row["train/skipped"] == 1.0
    assert "every response was correct" not in out
    assert ("warning: step 1: no learning signal, no groups: no prompt to train on: all 2 prompts of the step were "
            "skipped as longer than rollout.max_prompt_tokens = 2") in out
