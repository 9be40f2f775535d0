"""The RL trainer: rollouts -> rewards -> advantages -> clipped policy loss -> optimizer step, repeat.

    torchrun --nproc_per_node=8 train.py --config configs/cir-qwen2.5-math-7b.yaml
    python train.py                       # the embedded default: SmolLM2-135M, CPU, a few steps

One set of weights: the engine generates with the very parameters the optimizer updates (under
FSDP2 they are unsharded in place for the rollout). Each rank rolls out its own prompts; rewards
are gathered so advantages use the whole batch; the loss is normalised by the global count of
loss tokens so any split over ranks and micro-batches gives the same gradient.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import torch

from cir.config import Config, save_config
from cir.data.loader import PromptLoader
from cir.data.problems import default_problems_path, load_problems
from cir.data.prompts import build_prompt
from cir.engine import Engine, SamplingParams, ToolConfig, Trajectory
from cir.model import default_model_path, from_pretrained
from cir.rewards import score_many
from cir.rl import checkpoint, distributed, run_dir
from cir.rl.advantages import advantages as compute_advantages
from cir.rl.advantages import groups_with_signal
from cir.rl.batching import pack
from cir.rl.budget import ToolBudget
from cir.rl.evaluation import evaluate_problems
from cir.rl.logger import MetricsLogger, pick_samples
from cir.rl.loss import policy_loss
from cir.rl.partial import PartialRollout
from cir.rl.policy import PolicyForward
from cir.rl.step_metrics import held_out_change, signal_metrics, step_metrics
from cir.threads import configure_threads
from cir.tokenizer import load_tokenizer
from cir.trained_settings import trained_settings


class Trainer:
    def __init__(self, config: Config, resume: bool = False, sandbox=None, model=None, tokenizer=None):
        """`sandbox`, `model`, `tokenizer` may be given (tests, notebooks); else built from config."""
        self.config = cfg = config
        self.rank, self.world_size, self.device = distributed.init()
        torch.manual_seed(cfg.train.seed + self.rank)
        self.output_dir = Path(cfg.train.output_dir)
        run_dir.claim(self.output_dir, resume, cfg.train.overwrite)  # never mix two runs in one directory
        # 1) the sandbox server first: a small separate process, before any heavy torch work
        self.budget = ToolBudget.parse(cfg.rollout.tool_budget or {0: 0})
        self.sandbox = sandbox
        if self.sandbox is None and self.budget.max_calls > 0:
            from cir_sandbox import Sandbox

            self.sandbox = Sandbox(workers=cfg.rollout.sandbox_workers, timeout=cfg.rollout.sandbox_timeout,
                                   memory_mb=cfg.rollout.sandbox_memory_mb)
        configure_threads(cfg.train.threads, reserved=cfg.rollout.sandbox_workers if self.sandbox is not None else 0,
                          log=distributed.print0)
        # 2) model and tokenizer
        path = cfg.model.path or (default_model_path() if model is None else None)
        self.tokenizer = tokenizer or load_tokenizer(path)
        dtype = getattr(torch, cfg.model.dtype)
        self.model = model if model is not None else from_pretrained(path, dtype=dtype, device=self.device)
        self.model.gradient_checkpointing = cfg.model.gradient_checkpointing
        if cfg.model.batch_invariant:  # exact mode: behaviour log-probs == the training forward's, bit for bit
            self.model.set_batch_invariant(True)
        # the KL reference: a frozen copy of the starting weights, only when the KL term is on
        self.reference = None
        if cfg.rl.kl_coef:
            self.reference = PolicyForward(copy.deepcopy(self.model).requires_grad_(False).eval())
        self.autocast = cfg.train.autocast == "bf16" or (cfg.train.autocast == "auto" and self.device.type == "cuda")
        # FSDP2 under autocast: parameters are unsharded in bf16 (the rollout reads them, no cast per step)
        masters = next(self.model.parameters()).dtype
        param_dtype = torch.bfloat16 if self.autocast and masters != torch.bfloat16 else None
        self.policy = distributed.wrap(PolicyForward(self.model), list(self.model.layers), cfg.train.parallel,
                                       self.device, param_dtype=param_dtype)
        # one fused kernel for all parameters on CUDA; foreach (a few multi-tensor ops) elsewhere
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                                           weight_decay=cfg.optim.weight_decay, fused=fused or None,
                                           foreach=None if fused else True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        if cfg.train.parallel == "fsdp" and self.world_size > 1:
            self._forward_through_root()  # after the optimizer took the sharded parameters
        # 3) engine on the model's own parameters
        self.engine = Engine(self.model, self.tokenizer, cfg.engine)
        self.engine.config.show_progress = self.rank == 0 and cfg.engine.show_progress
        # 4) data
        problems = load_problems(cfg.train.data or default_problems_path())
        self.held_out = []  # never trained on; evaluated before the first RL step and after the last
        if cfg.train.held_out:
            if cfg.train.held_out >= len(problems):
                raise ValueError(f"train.held_out = {cfg.train.held_out} leaves no problem to train on "
                                 f"({len(problems)} in the problem set)")
            problems, self.held_out = problems[:-cfg.train.held_out], problems[-cfg.train.held_out:]
        self.loader = PromptLoader(problems, cfg.train.prompts_per_step, seed=cfg.train.seed, rank=self.rank,
                                   world_size=self.world_size)
        self.partial = PartialRollout(self) if cfg.rollout.mode == "partial" else None  # cir/rl/partial.py
        self.step = 0
        if resume:
            self._resume()
        self.logger = MetricsLogger(self.output_dir, enabled=self.rank == 0, resume=resume, step=self.step)
        if self.rank == 0:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.output_dir / "config.yaml")
            if self.held_out:  # for `python -m cir.evaluate --model <checkpoint>/model --data <this file>`
                (self.output_dir / "held_out.jsonl").write_text("".join(json.dumps(
                    {"id": p.id, "problem": p.problem, "answer": p.answer}) + "\n" for p in self.held_out))

    @torch.no_grad()
    def _forward_through_root(self) -> None:
        """FSDP2 initialises lazily at the first forward through the root: make that the policy, not a
        block reached by the engine's rollout (which would make that block a root of its own)."""
        mb = pack([_DUMMY], [0.0], 1)[0].to(self.device)
        self.policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask)
        for module in distributed.fsdp_modules(self.policy):  # the root keeps its parameters unsharded
            module.reshard()

    # 1) schedule ---------------------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        o, total = self.config.optim, self.config.train.steps
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "cosine":
            progress = (step - o.warmup_steps) / max(total - o.warmup_steps, 1)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    # 2) rollout ---------------------------------------------------------------------------------------
    def rollout(self, problems: list) -> tuple[list[Trajectory], torch.Tensor, dict]:
        """This rank's trajectories (prompt-major) and rewards [G, n]."""
        cfg = self.config.rollout
        prompts, kept, keys = [], [], []
        for i, p in enumerate(problems):
            ids = self.tokenizer.encode(build_prompt(p, self.tokenizer, mode=cfg.prompt_mode))
            if len(ids) > cfg.max_prompt_tokens:
                print(f"rank {self.rank}: skipping problem {p.id}: prompt of {len(ids)} tokens > "
                      f"{cfg.max_prompt_tokens}", flush=True)
                continue
            prompts.append(ids)
            kept.append(p)
            keys.append(self.rank * len(problems) + i)  # the prompt's index in the global batch
        max_calls = self.budget.at(self.step)
        tools = ToolConfig(self.sandbox, max_calls=max_calls, on_budget_spent=cfg.on_budget_spent) \
            if max_calls > 0 and self.sandbox is not None else None
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens)
        t0 = time.perf_counter()
        self.model.eval()
        with distributed.unsharded(self.policy), self._autocast():
            trajs = self.engine.generate(prompts, params, n=cfg.n, tools=tools, prompt_keys=keys) if prompts else []
        self.model.train()
        t1 = time.perf_counter()
        self.rollout_problems = kept  # the problem of each group, for samples.jsonl
        self.num_skipped_prompts = len(problems) - len(kept)
        self.num_tool_infra_failures = self.engine.stats.get("num_tool_infra_failures", 0) if prompts else 0
        answers = [p.answer for p in kept for _ in range(cfg.n)]
        rewards = score_many([t.text for t in trajs], answers)
        t2 = time.perf_counter()
        timing = {"time/generate": t1 - t0, "time/reward": t2 - t1,
                  "time/sandbox_wait": self.engine.stats.get("seconds_waiting_on_tools", 0.0)}
        return trajs, torch.tensor(rewards, dtype=torch.float32).view(len(kept), cfg.n), timing

    def _tools(self) -> ToolConfig | None:
        """The interpreter at this step's budget; None when tools are off."""
        max_calls = self.budget.at(self.step)
        return ToolConfig(self.sandbox, max_calls=max_calls, on_budget_spent=self.config.rollout.on_budget_spent) \
            if max_calls > 0 and self.sandbox is not None else None

    # 3) update ----------------------------------------------------------------------------------------
    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages from the rewards of all ranks (the batch std is the global one); this rank's rows."""
        method = self.config.rl.advantage
        gathered = distributed.all_gather_object(rewards)
        full = torch.cat(gathered) if sum(r.numel() for r in gathered) else rewards
        if full.numel() == 0:
            return rewards
        std = False if method == "grpo_no_std" else None
        adv = compute_advantages(full, method="grpo" if method == "grpo_no_std" else method, std_normalize=std)
        start = sum(r.shape[0] for r in gathered[: self.rank])
        return adv[start : start + rewards.shape[0]]

    def update(self, trajs: list[Trajectory], rewards: torch.Tensor) -> dict:
        """Policy mini-batches over this rank's trajectories; returns step statistics (global)."""
        rl, n = self.config.rl, max(self.config.rollout.n, 1)
        adv = self.advantages(rewards)
        signal = groups_with_signal(rewards) if rewards.numel() else torch.zeros(rewards.shape[0], dtype=torch.bool)
        keep = signal if rl.filter_groups else torch.ones_like(signal)
        groups = [g for g in range(rewards.shape[0]) if keep[g]]
        (num_signal,) = distributed.all_reduce_sum([float(signal.sum())], self.device)
        if rl.filter_groups and num_signal == 0:  # nothing to learn: no optimizer / schedule step (see _signal)
            return {"skipped": 1.0, "grad_norm": 0.0, "num_loss_tokens": 0, "lr": self.scheduler.get_last_lr()[0]}
        stats = {"grad_norm": 0.0, "clip_frac": 0.0, "entropy": 0.0, "approx_kl": 0.0, "pg_loss": 0.0, "kl": 0.0}
        num_trained = self._train_tokens = 0
        # a group's mini-batch follows from its index in the global batch, so filtering groups out
        # never changes which mini-batch the others join, whatever the number of ranks
        offset = sum(distributed.all_gather_object(rewards.shape[0])[: self.rank])
        proximal = self.partial.proximal_logprobs(trajs, groups) if self.partial is not None else None
        for mb in range(rl.mini_batches):
            mine = [g for g in groups if (offset + g) % rl.mini_batches == mb]
            sel = [g * n + j for g in mine for j in range(n)]
            flat_adv = adv.reshape(-1).tolist()  # one read, not one per trajectory
            micro = pack([trajs[i] for i in sel], [flat_adv[i] for i in sel], self.config.train.micro_batch_tokens,
                         proximal=None if proximal is None else [proximal[i] for i in sel])
            # global normalisers: any split over ranks and micro-batches gives the same gradient
            local = [sum(m.num_loss_tokens for m in micro), sum(any(trajs[i].loss_mask) for i in sel)]
            global_tokens, global_seqs = distributed.all_reduce_sum(local, self.device)
            if global_tokens == 0:  # an empty mini-batch on every rank (filtered groups): no step
                continue
            # every rank runs as many micro-batches as the busiest one (FSDP collectives must pair up)
            (num_micro,) = distributed.all_reduce_max([len(micro)], self.device)
            first = num_trained == 0  # no optimizer step yet (an empty mini-batch 0 was skipped)
            sums = self._policy_step(micro, max(global_tokens, 1.0), max(global_seqs, 1.0), max(int(num_micro), 1),
                                     first=first)
            if first:  # recomputed at the behaviour weights: how off-policy the rollout's log-probs are
                for k in ("logprob_abs_mean", "logprob_abs_max", "clip_frac_first"):
                    stats[f"mismatch/{k}"] = sums[k]
            for k in ("clip_frac", "entropy", "approx_kl", "pg_loss", "kl"):
                stats[k] += sums[k] / max(global_tokens, 1.0) / rl.mini_batches
            if "is_trunc_frac" in sums:  # partial mode: tokens whose importance weight was truncated
                stats["is_trunc_frac"] = stats.get("is_trunc_frac", 0.0) \
                    + sums["is_trunc_frac"] / max(global_tokens, 1.0) / rl.mini_batches
            stats["grad_norm"] += sums["grad_norm"] / rl.mini_batches
            num_trained += global_tokens
        stats["num_loss_tokens"] = num_trained
        stats["skipped"] = 0.0
        stats["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        return stats

    def _policy_step(self, micro: list, global_tokens: float, global_seqs: float, num_micro: int,
                     first: bool = False) -> dict:
        """Forward/backward over `num_micro` micro-batches (this rank's, then zero-loss padding so every
        rank runs the same collectives), then one optimizer step.

        No host synchronisation inside the loop: the batches go to the device up front, every count
        the loss needs was taken on the host by `pack`, statistics accumulate as device tensors and
        are read back once, after the optimizer step (tests/test_update_sync.py counts the reads).
        `first`: the parameters are still the behaviour policy's, so the log-probs are also compared to
        the recorded ones (mismatch: sum and max of |behaviour - recomputed|, tokens whose ratio to the
        behaviour policy is outside the clip range)."""
        rl, temperature = self.config.rl, self.config.rollout.temperature or 1.0
        num_real = len(micro)
        micro = [mb.to(self.device) for mb in micro + pack([_DUMMY], [0.0], 1) * (num_micro - num_real)]
        sums = torch.zeros(len(_STAT_KEYS), dtype=torch.float32, device=self.device)  # token-weighted sums
        mismatch = torch.zeros(3, dtype=torch.float32, device=self.device)  # |gap| sum, |gap| max, outside clip
        current = torch.zeros((), dtype=torch.float32, device=self.device)  # partial: current-version tokens
        truncated = torch.zeros((), dtype=torch.float32, device=self.device)  # partial: is_trunc_frac, summed
        for i, mb in enumerate(micro):
            dummy = i >= num_real
            with distributed.gradient_sync(self.policy, enabled=i == len(micro) - 1), self._autocast():
                logprobs, entropy = self.policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask,
                                                temperature, mb.positions, mb.seq_lens)
                old = logprobs.detach() if rl.recompute_old_logprobs else mb.old_logprobs
                proximal = None  # partial mode: the policy at the start of the update (cir/rl/partial.py)
                if self.partial is not None:
                    proximal = logprobs.detach() if mb.proximal_logprobs is None else mb.proximal_logprobs
                ref = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref = self.reference(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask,
                                             temperature, mb.positions, mb.seq_lens)[0]
                loss, st = policy_loss(logprobs, old, mb.advantages, mb.mask, clip_low=rl.clip_low,
                                       clip_high=rl.clip_high, dual_clip=rl.dual_clip, agg=rl.loss_agg,
                                       seq_ids=mb.seq_ids, ref_logprobs=ref, kl_coef=rl.kl_coef,
                                       entropy=entropy, entropy_coef=rl.entropy_coef, num_tokens=global_tokens,
                                       num_seqs=global_seqs, num_seq_ids=mb.num_seqs, proximal_logprobs=proximal,
                                       weight_cap=self.config.rollout.is_weight_cap)
                loss = loss * self.world_size  # gradients are averaged over ranks
                if dummy:
                    loss = loss * 0.0
                loss.backward()
            if first and not dummy:
                # tokens sampled by these very weights (partial mode: the current version's only)
                here = mb.mask > 0 if mb.versions is None else (mb.mask > 0) & (mb.versions == self.step)
                gap = torch.where(here, (logprobs.detach().float() - mb.old_logprobs).abs(), 0.0)
                ratio = torch.exp(torch.where(here, logprobs.detach().float() - mb.old_logprobs, 0.0))
                outside = here & ((ratio < 1 - rl.clip_low) | (ratio > 1 + rl.clip_high))
                if mb.versions is not None:
                    current = current + here.sum()
                mismatch = torch.stack([mismatch[0] + gap.sum(), torch.maximum(mismatch[1], gap.amax()),
                                        mismatch[2] + outside.sum()])
            if not dummy:
                zero = sums.new_zeros(())
                sums += torch.stack([st[k].float() if st.get(k) is not None else zero for k in _STAT_KEYS]) \
                    * float(mb.num_loss_tokens)
                if "is_trunc_frac" in st:
                    truncated = truncated + st["is_trunc_frac"].float() * float(mb.num_loss_tokens)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.config.optim.grad_clip)
        self.optimizer.step()
        self.engine.refresh_rollout_weights()  # fp32 masters under autocast: the bf16 rollout copy, in place
        self.optimizer.zero_grad(set_to_none=True)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        norm = grad_norm.detach().float().reshape(1).to(sums.device)
        partial = [current.reshape(1), truncated.reshape(1)] if self.partial is not None else []
        values = torch.cat([sums, norm, mismatch, *partial]).tolist()  # the one read
        if partial:
            *values, num_current, num_truncated = values
        num_stats = len(_STAT_KEYS)
        out = dict(zip(_STAT_KEYS, distributed.all_reduce_sum(values[:num_stats], self.device), strict=True))
        out["grad_norm"] = values[num_stats]
        if first:
            gap_sum, outside = distributed.all_reduce_sum([values[-3], values[-1]], self.device)
            (gap_max,) = distributed.all_reduce_max([values[-2]], self.device)
            if partial:  # over the current version's tokens only
                (global_tokens,) = distributed.all_reduce_sum([num_current], self.device)
                global_tokens = max(global_tokens, 1.0)
            out.update(logprob_abs_mean=gap_sum / global_tokens, logprob_abs_max=gap_max,
                       clip_frac_first=outside / global_tokens)
        if partial:
            (out["is_trunc_frac"],) = distributed.all_reduce_sum([num_truncated], self.device)
        return out

    # 4) the loop ----------------------------------------------------------------------------------------
    def train(self) -> None:
        if self.step == 0 and self.config.train.warm_start:
            self.warm_start()
        before = None
        if self.held_out:
            before = self.evaluate_held_out("before RL" if self.step == 0 else f"at step {self.step} (resumed)")
        while self.step < self.config.train.steps:
            self.train_step()
        if self.held_out:
            after = self.evaluate_held_out("after RL")
            distributed.print0(held_out_change(before, after, len(self.held_out), self.config.rollout.n))
        self.logger.close()

    def train_step(self) -> dict:
        """One RL step: rollout, rewards, update; then metrics, checkpoint and evaluation as due."""
        cfg = self.config.train
        t0 = time.perf_counter()
        if self.partial is None:
            trajs, rewards, timing = self.rollout(next(self.loader))
        else:  # rollout.mode partial: groups from the stream, cir/rl/partial.py
            trajs, rewards, timing = self.partial.rollout(self.step, self._tools())
        t1 = time.perf_counter()
        stats = self.update(trajs, rewards)
        t2 = time.perf_counter()
        self.step += 1
        budget = self.budget.at(self.step - 1)
        metrics = step_metrics(trajs, rewards, stats, timing, t1 - t0, t2 - t1, tool_budget=budget,
                               infra_failures=getattr(self, "num_tool_infra_failures", 0), device=self.device)
        metrics.update(signal_metrics(trajs, rewards, stats, self.step, self.config.rollout,
                                      num_skipped=getattr(self, "num_skipped_prompts", 0), tools_on=budget > 0,
                                      device=self.device))
        if self.partial is not None:
            metrics.update(self.partial.metrics)
        self.logger.log(self.step, metrics, pick_samples(trajs, cfg.log_samples), self.tokenizer,
                        problems=self.rollout_problems, rewards=rewards)
        if cfg.save_every and (self.step % cfg.save_every == 0 or self.step == cfg.steps):
            self.save()
        if cfg.eval_every and cfg.eval_data and self.step % cfg.eval_every == 0:
            self.evaluate()
        return metrics

    # 5) checkpoints and evaluation --------------------------------------------------------------------
    def save(self) -> Path:
        extra = {"scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "generator": self.engine.runner.generator.get_state()}
        if self.partial is not None:  # the carried sequences and the stream's position
            extra["partial"] = self.partial.state_dict()
        path = checkpoint.save(self.output_dir / "checkpoints", self.step, self.policy, self.model,
                               self.optimizer, extra, tokenizer=self.tokenizer, keep_last=self.config.train.keep_last,
                               model_meta=trained_settings(self.config, self.step))
        distributed.print0(f"saved {path}")
        return path

    def _resume(self) -> None:
        path = checkpoint.latest_verified(self.output_dir / "checkpoints")  # skips damaged ones, saying so
        if path is None:
            distributed.print0(f"--resume: no checkpoint under {self.output_dir / 'checkpoints'}; starting fresh")
            return
        extra = checkpoint.load(path, self.policy, self.optimizer)
        self.scheduler.load_state_dict(extra["scheduler"])
        self.loader.load_state_dict(extra["loader"])
        self.engine.runner.generator.set_state(extra["generator"])
        if self.partial is not None:
            if "partial" not in extra:
                raise ValueError(f"{path} was written by a sync-mode run: resume it with --rollout.mode sync")
            self.partial.load_state_dict(extra["partial"])
        self.step = extra["step"]
        distributed.print0(f"resumed from {path} at step {self.step}")

    def evaluate(self) -> dict:
        results = {}
        for path in self.config.train.eval_data:
            results[Path(path).stem] = evaluate_problems(self, load_problems(path))
        self.logger.log_eval(self.step, results)
        return results

    def warm_start(self, exercises: list | None = None) -> dict:
        """Supervised warm start on `train.warm_start` synthetic traces (cir/rl/warm_start.py), or on
        traces of the given `cir.data.arithmetic.Exercise`s."""
        from cir.rl.warm_start import warm_start

        num = self.config.train.warm_start if exercises is None else len(exercises)
        distributed.print0(f"warm start: {num} synthetic traces "
                           f"({self.config.train.warm_start_tool_fraction:.0%} with the interpreter)")
        stats = warm_start(self, exercises)
        distributed.print0(f"warm start: loss {stats['warm_start/loss_first']:.3f} -> "
                           f"{stats['warm_start/loss_last']:.3f} in {stats['warm_start/steps']} steps, "
                           f"{stats['time/warm_start']:.0f}s")
        self.logger.log_eval(self.step, {"warm_start": stats})
        return stats

    def evaluate_held_out(self, when: str) -> dict:
        """The `train.held_out` problems at the rollout's settings; printed and written to eval.jsonl."""
        metrics = evaluate_problems(self, self.held_out)
        n = self.config.rollout.n
        distributed.print0(f"held-out {when} ({len(self.held_out)} problems x {n}): "
                           f"accuracy {metrics[f'avg@{n}']:.3f}, "
                           f"using the interpreter {metrics['tools/responses_using_tool']:.3f}, "
                           f"boxed {metrics['answer/boxed_rate']:.3f}")
        self.logger.log_eval(self.step, {"held_out": metrics, "when": when})
        return metrics

    def close(self) -> None:
        if self.sandbox is not None and hasattr(self.sandbox, "close"):
            self.sandbox.close()
        distributed.finish()


_STAT_KEYS = ("clip_frac", "entropy", "approx_kl", "pg_loss", "kl")


class _Dummy:
    prompt_ids, response_ids, loss_mask, logprobs = [0], [0], [0], [0.0]


_DUMMY = _Dummy()
