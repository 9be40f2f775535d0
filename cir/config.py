"""Run configuration: dataclasses that validate themselves, loaded from YAML with CLI overrides.

    cfg = load_config("configs/cir-qwen2.5-math-7b.yaml", ["--rl.clip_high", "0.28", "--train.steps=5"])

Sections: model, engine (cir.engine.EngineConfig), rollout, rl, optim, train. An unknown section or
field, a value of the wrong type, or a YAML syntax error is a `cir.errors.UserError` (a ValueError)
naming it (a YAML error with its file:line); a missing file is a MissingPathError. The resolved config
is saved next to the run's outputs (`save_config`).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from cir.engine.config import EngineConfig
from cir.errors import MissingPathError, UserError, location


@dataclass
class ModelSection:
    path: str | None = None
    """HF model directory; None: the embedded default (SmolLM2-135M-Instruct converted offline)."""
    dtype: str = "float32"
    """Parameter dtype: "float32" or "bfloat16". With float32 params, `train.autocast` picks bf16 math on GPU."""
    gradient_checkpointing: bool = False
    batch_invariant: bool = False
    """Exact mode (`Transformer.set_batch_invariant`): the engine's behaviour log-probs equal the training
    forward's bit for bit, whatever the batching; slower (README, "Exact on-policy mode")."""

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"model.dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")


@dataclass
class RolloutSection:
    n: int = 16
    """Samples per prompt (the group)."""
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_tokens: int = 1024
    """Longer prompts are skipped with a warning."""
    max_response_tokens: int = 4096
    """Response limit, interpreter feedback included."""
    tool_budget: dict = field(default_factory=lambda: {0: 2, 100: 3, 200: 4})
    """Step -> max tool calls per trajectory from that step on. {} or {0: 0} turns tools off."""
    on_budget_spent: str = "continue"
    prompt_mode: str = "raw"
    """"raw" (the paper's base-model prompt, no chat template) or "chat"."""
    sandbox_workers: int = 4
    sandbox_timeout: float = 10.0
    sandbox_memory_mb: int = 1024
    mode: str = "sync"
    """"sync" (the paper's): each step decodes its prompts to the end, then trains. "partial": the engine
    never drains; a step trains on the first train.prompts_per_step groups to finish from a stream of
    prompt groups, unfinished sequences carry into the next step (cir/rl/partial.py), and the loss
    corrects their staleness (the decoupled objective, cir/rl/loss.py)."""
    max_staleness: int | None = 1
    """Partial mode: the most policy versions a trained token may lag the update (older carried sequences
    restart from their prompt); None: unbounded."""
    is_weight_cap: float | None = 5.0
    """Partial mode: truncation of the importance weight behaviour -> proximal policy (None: untruncated)."""

    def __post_init__(self):
        if self.mode not in ("sync", "partial"):
            raise ValueError(f"rollout.mode must be 'sync' or 'partial', got {self.mode!r}")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0 (or null: unbounded), got {self.max_staleness}")
        if self.is_weight_cap is not None and self.is_weight_cap < 1:
            raise ValueError(f"rollout.is_weight_cap must be >= 1 (or null: untruncated), got {self.is_weight_cap}")
        if self.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.n}")
        if self.prompt_mode not in ("raw", "chat", "plain"):
            raise ValueError(f"rollout.prompt_mode must be 'raw', 'chat' or 'plain', got {self.prompt_mode!r}")
        if self.max_prompt_tokens < 1 or self.max_response_tokens < 1:
            raise ValueError("rollout.max_prompt_tokens and rollout.max_response_tokens must be >= 1")


@dataclass
class RLSection:
    advantage: str = "reinforce_pp_baseline"
    """"reinforce_pp_baseline" (default, the paper), "grpo", "grpo_no_std" or "rloo"."""
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    filter_groups: bool = True
    """Drop groups whose rewards are all equal (no signal) before the update; a step where no group
    has signal then skips the update (no optimizer step), and says so either way."""
    recompute_old_logprobs: bool = False
    """Recompute old log-probs with a training forward instead of the engine's behaviour log-probs."""
    mini_batches: int = 2
    """Policy updates per rollout batch (the paper: 128 prompts, mini-batch 64 -> 2)."""

    def __post_init__(self):
        if self.advantage not in ("reinforce_pp_baseline", "grpo", "grpo_no_std", "rloo"):
            raise ValueError(f"rl.advantage: unknown method {self.advantage!r}")
        if not (0 <= self.clip_low < 1 and self.clip_high >= 0):
            raise ValueError(f"rl.clip_low must be in [0, 1) and clip_high >= 0, got {self.clip_low}, {self.clip_high}")
        if self.mini_batches < 1:
            raise ValueError(f"rl.mini_batches must be >= 1, got {self.mini_batches}")
        if self.loss_agg not in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
            raise ValueError(f"rl.loss_agg must be token_mean, seq_mean_token_sum or seq_mean_token_mean, "
                             f"got {self.loss_agg!r}")


@dataclass
class OptimSection:
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    schedule: str = "constant"
    """"constant" or "cosine" (after warm-up, to 10% of lr at train.steps)."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        self.betas = tuple(self.betas)


@dataclass
class TrainSection:
    data: str | None = None
    """Problem set (JSONL or verl parquet); None: the project's embedded arithmetic set."""
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 0
    """Evaluate on eval_data every K steps (0: never)."""
    steps: int = 300
    prompts_per_step: int = 128
    micro_batch_tokens: int = 16384
    """Token budget of one packed training micro-batch (per rank)."""
    seed: int = 0
    output_dir: str = "runs/cir"
    """The run directory: config.yaml, metrics, samples, checkpoints. It belongs to one run: starting
    without --resume where another run left checkpoints or metrics is an error (see `overwrite`)."""
    overwrite: bool = False
    """Start over in an output_dir that holds another run: its checkpoints, metrics, samples, eval
    results, TensorBoard events and curves are deleted first. Not together with --resume."""
    save_every: int = 50
    keep_last: int = 2
    """Checkpoints kept (>= 1); the one just written is always among them."""
    parallel: str = "ddp"
    """"ddp" (replicated) or "fsdp" (FSDP2 fully_shard) when more than one rank runs."""
    autocast: str = "auto"
    """"auto" (bf16 on CUDA, off on CPU), "bf16" or "off"."""
    log_samples: int = 2
    """Rollouts written to samples.jsonl per step (feedback blocks marked)."""
    warm_start: int = 0
    """Synthetic code-integrated traces for a supervised warm start before the first RL step
    (cir/rl/warm_start.py); 0: none."""
    warm_start_tool_fraction: float = 0.3
    """Share of warm-start traces that use the interpreter (the rest answer directly)."""
    warm_start_lr: float = 1e-4
    warm_start_epochs: int = 1
    warm_start_batch: int = 32
    """Warm-start traces per optimizer step."""
    threads: int | None = None
    """Torch intra-op threads; None: the usable CPUs (affinity, cgroup quota) less the sandbox workers,
    unless OMP_NUM_THREADS is set (cir/threads.py). Printed once at start."""
    held_out: int = 0
    """The last K problems of train.data are never trained on; they are evaluated (at the rollout's
    settings) before the first RL step and after the last, and both results printed."""

    def __post_init__(self):
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.autocast not in ("auto", "bf16", "off"):
            raise ValueError(f"train.autocast must be 'auto', 'bf16' or 'off', got {self.autocast!r}")
        if self.steps < 1 or self.prompts_per_step < 1:
            raise ValueError("train.steps and train.prompts_per_step must be >= 1")
        if self.warm_start < 0 or self.held_out < 0:
            raise ValueError(f"train.warm_start and train.held_out must be >= 0, got {self.warm_start}, "
                             f"{self.held_out}")
        if not 0.0 <= self.warm_start_tool_fraction <= 1.0:
            raise ValueError(f"train.warm_start_tool_fraction must be in [0, 1], got {self.warm_start_tool_fraction}")
        if self.warm_start_lr <= 0 or self.warm_start_epochs < 1 or self.warm_start_batch < 1:
            raise ValueError("train.warm_start_lr must be > 0 and warm_start_epochs, warm_start_batch >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"train.threads must be >= 1 (or null: automatic), got {self.threads}")
        if self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1, got {self.keep_last}")


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    engine: EngineConfig = field(default_factory=EngineConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    rl: RLSection = field(default_factory=RLSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)

    def __post_init__(self):
        if self.rollout.mode == "partial" and self.rl.recompute_old_logprobs:
            raise ValueError("rl.recompute_old_logprobs does not apply in rollout.mode partial: the loss clips "
                             "against the policy at the start of the update already (the proximal policy)")
        if self.rollout.mode == "partial" and self.rollout.n > self.engine.max_num_seqs:
            raise ValueError(f"rollout.mode partial runs a group's {self.rollout.n} samples together: "
                             f"engine.max_num_seqs ({self.engine.max_num_seqs}) must be >= rollout.n")


def _coerce(value, annotation, where: str):
    """Turn a YAML / command-line value into the field's declared type."""
    tp = eval(annotation, vars(typing), {}) if isinstance(annotation, str) else annotation
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else (tp,)
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        if type(None) in options:
            return None
        raise ValueError(f"{where} cannot be None")
    if isinstance(value, bool) and str in options and bool not in options:  # YAML 1.1: off/no/yes -> bool
        raise ValueError(f"{where}: got the YAML boolean {value}; quote the value, e.g. \"off\"")
    for option in (o for o in options if o is not type(None)):
        origin = typing.get_origin(option) or option
        try:
            if origin is bool:
                if isinstance(value, str):
                    if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    return value.lower() in ("true", "1", "yes")
                return bool(value)
            if origin in (int, float, str):
                if origin is int and isinstance(value, float) and not value.is_integer():
                    raise ValueError
                return origin(value)
            if origin in (dict, list, tuple):
                parsed = yaml.safe_load(value) if isinstance(value, str) else value
                if not isinstance(parsed, (dict, list, tuple)) or (origin is dict) != isinstance(parsed, dict):
                    raise ValueError
                return origin(parsed)
        except (TypeError, ValueError, yaml.YAMLError):
            continue
    raise ValueError(f"{where}: cannot use {value!r} as {annotation}")


def _build(section_cls, values: dict, where: str):
    fields = {f.name: f for f in dataclasses.fields(section_cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config field {where}.{key}; known: {', '.join(fields)}")
        kwargs[key] = _coerce(value, fields[key].type, f"{where}.{key}")
    return section_cls(**kwargs)


def _read_yaml(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise MissingPathError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:  # the library's own message spans several lines: keep its gist
        mark = getattr(e, "problem_mark", None)
        what = ": ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x) or str(e)
        raise UserError(f"invalid YAML: {what}", where=location(path, mark.line + 1 if mark else None)) from None
    except UnicodeDecodeError as e:
        raise UserError(f"config file is not UTF-8 text ({e.reason} at byte {e.start})", where=str(path)) from None
    if not isinstance(raw, dict):
        raise UserError("the config must be a mapping of sections", where=str(path))
    return raw


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """YAML file (optional) + overrides like `--rl.clip_high 0.28` or `--rl.clip_high=0.28`."""
    try:
        return _load(path, overrides)
    except UserError:
        raise
    except ValueError as e:  # every section validates itself with ValueError: all of them are the user's
        raise UserError(str(e)) from None


def _load(path: str | None, overrides: list[str] | None) -> Config:
    raw: dict = _read_yaml(path) if path is not None else {}
    args = list(overrides or [])
    while args:
        arg = args.pop(0)
        if not arg.startswith("--") or "." not in arg:
            raise ValueError(f"override must look like --section.field VALUE, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        if not _:
            if not args:
                raise ValueError(f"override {arg} has no value")
            value = args.pop(0)
        section, _, name = key.partition(".")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        raw[section][name] = value  # a string: typed by the field it lands in (_coerce)
    sections = {f.name: f.default_factory for f in dataclasses.fields(Config)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ValueError(f"unknown config section {name!r}; known: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section {name!r} must be a mapping, got {values!r}")
        built[name] = _build(sections[name], values, name)
    return Config(**built)


def save_config(config: Config, path: str | Path) -> None:
    def plain(x):  # tuples -> lists, for safe YAML; int keys stay ints
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return [plain(v) for v in x] if isinstance(x, (list, tuple)) else x

    Path(path).write_text(yaml.safe_dump(plain(asdict(config)), sort_keys=False))
