"""The trainer's held-out evaluation: the evaluation core (`cir.eval`) run on the trainer's own engine.

    metrics = evaluate_problems(trainer, load_problems("held_out.jsonl"))   # every rank calls it

Used by `Trainer.evaluate` (every `train.eval_every` steps on `train.eval_data`).
"""
from __future__ import annotations

from cir.data.problems import Problem
from cir.engine import SamplingParams, ToolConfig
from cir.engine.progress import GenerationProgress
from cir.eval import rollout_records, summarize
from cir.rl import distributed


def evaluate_problems(trainer, problems: list[Problem]) -> dict:
    """The trainer's held-out evaluation: each rank its slice of the problems, at the rollout's
    sampling settings and the current tool budget; metrics over all ranks (every rank returns them).

    The engine's sampling generator is restored afterwards, so evaluating never changes the
    training rollouts (a resumed run matches an uninterrupted one with or without evaluation).
    """
    cfg = trainer.config.rollout
    mine = problems[distributed.rank()::distributed.world_size()]
    max_calls = trainer.budget.at(trainer.step)
    tools = ToolConfig(trainer.sandbox, max_calls=max_calls, on_budget_spent=cfg.on_budget_spent) \
        if max_calls > 0 and trainer.sandbox is not None else None
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens)
    progress = GenerationProgress("held-out", enabled=trainer.engine.config.show_progress)
    generator = trainer.engine.runner.generator
    rng_state, was_training = generator.get_state(), trainer.model.training
    trainer.model.eval()
    try:
        with distributed.unsharded(trainer.policy), trainer._autocast():  # every rank: unshard is collective
            records, timing = rollout_records(trainer.engine, trainer.tokenizer, mine, cfg.n, params, tools,
                                              cfg.prompt_mode, max_prompt_tokens=cfg.max_prompt_tokens,
                                              progress=progress)
    finally:
        trainer.model.train(was_training)
        generator.set_state(rng_state)
    slim = [{k: v for k, v in r.items() if k not in ("problem", "responses")} for r in records]
    gathered = [r for part in distributed.all_gather_object(slim) for r in part]
    if not gathered:
        return {"num_problems": 0}
    metrics = summarize(gathered, cfg.n)["metrics"]
    metrics.update(timing)  # this rank's seconds
    return metrics
