"""Supervised warm start on synthetic code-integrated traces, before the first RL step.

    python train.py --train.warm_start 256 --train.warm_start_tool_fraction 0.3

A small model (SmolLM2-135M) never writes a correct `\\boxed{}` answer to multi-digit arithmetic on
its own, so every group's rewards are equal and RL has nothing to learn from. As cold-start SFT
does for small models, a short supervised pass on traces in the paper's format gives it a non-zero
success rate first. A trace answers one exercise of `cir.data.arithmetic` (fresh ones: another
seed, and none of the run's problems) in the rollout's own prompt format, either

    with the tool:  ```python\\nprint(481*325)\\n```  + the sandbox's real output block +  \\boxed{156325}
    or directly:    \\boxed{156325}

and a `tool_fraction` of them use the tool. The mix is what leaves room for RL: the model copies the
tool traces well (they are solvable) but cannot compute the direct answers, so after the warm start
about `tool_fraction` of its responses are right, and RL raises that by rewarding the tool.

Token in, token out as in RL: each piece is encoded on its own (the engine samples up to the
closing fence, appends the feedback tokens, samples again), the output block has loss mask 0, and
the loss is the mean negative log-likelihood of the masked-in tokens, through the same packed
training forward (`PolicyForward`) and the same micro-batching (`pack`) as the RL update. It has
its own AdamW, so the RL optimizer starts clean. Under torchrun every rank runs the same traces
(the warm start is tiny; identical gradients averaged over ranks are the single-process gradient).
"""
from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from cir.data import arithmetic
from cir.data.prompts import build_prompt
from cir.engine.tools import feedback_text
from cir.rl import distributed
from cir.rl.batching import pack
from cir_sandbox.result import format_feedback

SEED_OFFSET = 7919  # warm-start exercises come from train.seed + this, never from the embedded set's seed


@dataclass
class Trace:
    """One supervised trace, shaped like an engine trajectory (what `pack` reads)."""

    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # 1 on the model's tokens, 0 on the interpreter's output block
    uses_tool: bool
    logprobs: list[float] = field(init=False)  # unused by the supervised loss; `pack` carries them

    def __post_init__(self):
        self.logprobs = [0.0] * len(self.response_ids)


def build_traces(exercises: list[arithmetic.Exercise], tokenizer, executor, prompt_mode: str,
                 tool_fraction: float, seed: int = 0) -> list[Trace]:
    """One trace per exercise; exactly round(tool_fraction * len) of them (chosen by `seed`) use the tool.

    `executor.submit(code) -> Future[Result]` (a `cir_sandbox.Sandbox`): tool traces carry the output
    block the sandbox really printed, and box that output."""
    if not 0.0 <= tool_fraction <= 1.0:
        raise ValueError(f"tool_fraction must be in [0, 1], got {tool_fraction}")
    rng = random.Random(seed)
    with_tool = set(rng.sample(range(len(exercises)), round(tool_fraction * len(exercises))))
    if with_tool and executor is None:
        raise ValueError("tool traces need an executor (the sandbox): give rollout.tool_budget calls, or set "
                         "train.warm_start_tool_fraction 0")
    futures = {i: executor.submit(exercises[i].code) for i in sorted(with_tool)}
    traces = []
    for i, ex in enumerate(exercises):
        if i in futures:
            result = futures[i].result()
            printed = result.stdout.strip() if result.status == "ok" else None
            if not printed:
                raise RuntimeError(f"warm start: {ex.code!r} did not print an answer in the sandbox "
                                   f"({result.status}: {format_feedback(result)})")
            pieces = [(f"```python\n{ex.code}\n```", 1), (feedback_text(format_feedback(result)), 0),
                      (f"\\boxed{{{printed}}}", 1)]
        else:
            pieces = [(f"\\boxed{{{ex.problem.answer}}}", 1)]
        response, mask = [], []
        for text, m in pieces:
            ids = tokenizer.encode(text)
            response += ids
            mask += [m] * len(ids)
        response.append(tokenizer.eos_token_id)
        mask.append(1)
        prompt = tokenizer.encode(build_prompt(ex.problem, tokenizer, mode=prompt_mode))
        traces.append(Trace(prompt, response, mask, uses_tool=i in futures))
    return traces


def supervised_steps(policy, traces: list[Trace], lr: float, epochs: int = 1, batch_size: int = 32,
                     micro_batch_tokens: int = 16384, grad_clip: float = 1.0, seed: int = 0,
                     device: torch.device | None = None, autocast=None, show_progress: bool = False) -> list[float]:
    """AdamW on the traces' masked mean NLL through `policy` (a PolicyForward, maybe DDP / FSDP
    wrapped); one optimizer step per `batch_size` traces. Returns the loss of every step.
    `show_progress`: a "warm start" bar on stderr (steps, loss, time left)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
    device = device or next(policy.parameters()).device
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    order, rng, losses = list(range(len(traces))), random.Random(seed), []
    bar = tqdm(total=epochs * -(-len(traces) // batch_size), desc="warm start", unit="step", leave=False,
               disable=not show_progress)
    for _ in range(epochs):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = [traces[i] for i in order[start:start + batch_size]]
            micro = pack(batch, [0.0] * len(batch), micro_batch_tokens)
            num_tokens = max(sum(float(mb.mask.sum()) for mb in micro), 1.0)
            total = 0.0
            for i, mb in enumerate(micro):
                mb = mb.to(device)
                with distributed.gradient_sync(policy, enabled=i == len(micro) - 1), (autocast or nullcontext)():
                    logprobs, _ = policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask)
                    loss = -(logprobs.float() * mb.mask).sum() / num_tokens
                    loss.backward()
                total += float(loss.detach())
            torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            bar.set_postfix_str(f"loss {total:.3f}", refresh=False)
            bar.update(1)
    bar.close()
    return losses


def warm_start(trainer, exercises: list[arithmetic.Exercise] | None = None) -> dict:
    """The trainer's warm start (`train.warm_start` traces; `exercises` overrides which): builds the
    traces, trains on them, and returns metrics (`warm_start/*`, `time/warm_start`)."""
    cfg = trainer.config
    t0 = time.perf_counter()
    if exercises is None:
        seen = {p.problem for p in [*trainer.loader.problems, *trainer.held_out]}  # never a run problem's answer
        exercises = arithmetic.exercises(cfg.train.warm_start, seed=cfg.train.seed + SEED_OFFSET, prefix="warm",
                                         exclude=seen)
    traces = build_traces(exercises, trainer.tokenizer, trainer.sandbox, cfg.rollout.prompt_mode,
                          cfg.train.warm_start_tool_fraction, seed=cfg.train.seed)
    trainer.model.train()
    losses = supervised_steps(trainer.policy, traces, cfg.train.warm_start_lr, epochs=cfg.train.warm_start_epochs,
                              batch_size=cfg.train.warm_start_batch, micro_batch_tokens=cfg.train.micro_batch_tokens,
                              grad_clip=cfg.optim.grad_clip, seed=cfg.train.seed, device=trainer.device,
                              autocast=trainer._autocast, show_progress=trainer.engine.config.show_progress)
    return {"warm_start/traces": len(traces),
            "warm_start/tool_fraction": sum(t.uses_tool for t in traces) / max(len(traces), 1),
            "warm_start/steps": len(losses), "warm_start/loss_first": losses[0] if losses else 0.0,
            "warm_start/loss_last": losses[-1] if losses else 0.0, "time/warm_start": time.perf_counter() - t0}
