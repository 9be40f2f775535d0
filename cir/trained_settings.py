"""How a checkpoint was trained: the prompt and sampling settings its evaluation should reuse.

    settings = trained_settings(config, step)              # the trainer, at each checkpoint save
    write_trained_settings(model_dir, settings)            # -> model_dir/cir.json
    settings, source = find_trained_settings(model_dir)    # cir.evaluate --model model_dir

A model trained on one prompt format answers in that format only: the default run trains with the
`plain` prompt and scores 0 under the paper's `raw` prompt. So the trainer writes `cir.json` beside
config.json in every checkpoint's model directory: the prompt mode (and whether it went through the
chat template), the rollout's sampling settings, its response limit and the tool budget at that
step. A checkpoint written before that file existed is read from the run's `config.yaml` found
above it (`<run>/checkpoints/step_K/model`), the tool budget taken at step K.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from cir.config import Config, load_config
from cir.errors import UserError

META_FILE = "cir.json"
FIELDS = ("prompt_mode", "chat_template", "n", "temperature", "top_p", "max_prompt_tokens", "max_response_tokens",
          "max_tool_calls", "on_budget_spent", "sandbox_timeout", "sandbox_memory_mb", "step")
_STEP_DIR = re.compile(r"^step_(\d+)$")


def trained_settings(config: Config, step: int) -> dict:
    """The settings of `config`'s rollouts at `step` (what `cir.json` holds)."""
    from cir.rl.budget import ToolBudget

    r = config.rollout
    return {"prompt_mode": r.prompt_mode, "chat_template": r.prompt_mode == "chat", "n": r.n,
            "temperature": r.temperature, "top_p": r.top_p, "max_prompt_tokens": r.max_prompt_tokens,
            "max_response_tokens": r.max_response_tokens,
            "max_tool_calls": ToolBudget.parse(r.tool_budget or {0: 0}).at(step),
            "on_budget_spent": r.on_budget_spent, "sandbox_timeout": r.sandbox_timeout,
            "sandbox_memory_mb": r.sandbox_memory_mb, "step": step}


def write_trained_settings(model_dir: str | Path, settings: dict) -> Path:
    path = Path(model_dir) / META_FILE
    path.write_text(json.dumps(settings, indent=2) + "\n")
    return path


def find_trained_settings(model_dir: str | Path) -> tuple[dict | None, str | None]:
    """(settings, where they were read) for a model directory; (None, None) for a model the trainer
    did not write (a downloaded one). `cir.json` in the directory first, else, for a directory laid
    out as the trainer writes it (`<run>/checkpoints/step_K/model`), the run's config.yaml at step K."""
    model_dir = Path(model_dir)
    meta = model_dir / META_FILE
    if meta.is_file():
        try:
            settings = json.loads(meta.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"unreadable training settings: {e}", where=str(meta),
                            hint="delete the file to evaluate with the defaults") from None
        if not isinstance(settings, dict) or "prompt_mode" not in settings:
            raise UserError("training settings without a prompt_mode", where=str(meta))
        return settings, str(meta)
    resolved = model_dir.resolve()
    step_dir = resolved.parent
    m = _STEP_DIR.match(step_dir.name)
    config_path = step_dir.parent.parent / "config.yaml"
    if resolved.name != "model" or m is None or step_dir.parent.name != "checkpoints" or not config_path.is_file():
        return None, None
    return trained_settings(load_config(config_path), int(m.group(1))), str(config_path)
