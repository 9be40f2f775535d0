"""Rank-0 observability: per-step JSONL metrics, TensorBoard when installed, rollout samples.

    <output_dir>/metrics.jsonl   one JSON object per step ({"step": k, ...metrics})
    <output_dir>/samples.jsonl   `train.log_samples` rollouts per step, of distinct problems while the
                                 step has enough (`pick_samples`): step, problem_id, problem, reference answer,
                                 extracted answer (last \\boxed{}), reward, tool calls (made / ran
                                 cleanly), finish reason, response tokens, and the text with the
                                 interpreter feedback wrapped in <<<feedback ... >>>
    <output_dir>/eval.jsonl      evaluation results, when evaluation runs
    <output_dir>/tb/             TensorBoard events (if `tensorboard` is importable)
"""
from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from cir.engine.tools import marked_text
from cir.rewards import extract_boxed
from cir.rl.run_dir import drop_records_after


class MetricsLogger:
    def __init__(self, output_dir: Path, enabled: bool = True, resume: bool = False, step: int = 0):
        """`resume`: append to the files of the run being resumed at `step` (its rows of later steps are
        dropped first, and TensorBoard hides its events from step + 1 on); else start them afresh."""
        self.enabled = enabled
        self.output_dir = Path(output_dir)
        self.tb = None
        if not enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            drop_records_after(self.output_dir, step)
        mode = "a" if resume else "w"
        self.metrics = open(self.output_dir / "metrics.jsonl", mode)
        self.samples = open(self.output_dir / "samples.jsonl", mode)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.output_dir / "tb"), purge_step=step + 1 if resume else None)
        except ImportError:
            pass

    def log(self, step: int, metrics: dict, samples: list, tokenizer, problems: list | None = None,
            rewards=None) -> None:
        """`samples`: trajectories of this step's rollout; `problems[traj.prompt_index]` is the problem of
        each and `rewards[traj.prompt_index][traj.sample_index]` its reward ([G, n], tensor or lists)."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self.metrics.flush()
        for traj in samples:
            self.samples.write(json.dumps(sample_record(step, traj, tokenizer, problems, rewards),
                                          ensure_ascii=False) + "\n")
        self.samples.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                self.tb.add_scalar(key, value, step)
        signal = ""
        if "signal/groups" in metrics:
            signal = f" signal {metrics['signal/groups_with_signal']:.0f}/{metrics['signal/groups']:.0f}"
            signal += " (no signal: update skipped)" if metrics.get("train/skipped") else \
                f" grad {metrics.get('train/grad_norm', 0.0):.3f}"
        tqdm.write(
            f"step {step}: reward {metrics['reward/mean']:+.3f} acc {metrics['accuracy']:.3f} "
            f"tools/resp {metrics['tools/calls_per_response']:.2f} used {metrics['tools/responses_using_tool']:.2f} "
            f"len {metrics['response/length_mean']:.0f}{signal} "
            f"gen {metrics['time/generate']:.1f}s train {metrics['time/train']:.1f}s"
        )

    def log_eval(self, step: int, results: dict) -> None:
        if not self.enabled:
            return
        with open(self.output_dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **results}) + "\n")

    def close(self) -> None:
        if self.enabled:
            self.metrics.close()
            self.samples.close()
            if self.tb is not None:
                self.tb.close()


def pick_samples(trajs: list, k: int) -> list:
    """`k` of a step's trajectories, one per problem first: sample 0 of problems 0, 1, ..., then
    sample 1 of each, and so on (a group's samples share their problem and are often alike)."""
    return sorted(trajs, key=lambda t: (t.sample_index, t.prompt_index))[:max(k, 0)]


def sample_record(step: int, traj, tokenizer, problems: list | None = None, rewards=None) -> dict:
    """One samples.jsonl row: which problem, what the reference and the response's answers are, the
    reward, tool use, how the response ended, and its text (feedback marked)."""
    problem = problems[traj.prompt_index] if problems is not None else None
    reward = None
    if rewards is not None:
        reward = float(rewards[traj.prompt_index][traj.sample_index])
    return {
        "step": step, "problem_id": getattr(problem, "id", None), "problem": getattr(problem, "problem", None),
        "answer": getattr(problem, "answer", None), "extracted_answer": extract_boxed(traj.text),
        "reward": reward, "num_tool_calls": traj.num_tool_calls, "num_tool_successes": traj.num_tool_successes,
        "finish_reason": traj.finish_reason, "num_response_tokens": len(traj.response_ids),
        "text": marked_text(traj, tokenizer),
    }
