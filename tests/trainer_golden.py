"""Golden sync-mode trainer steps: fixed seeds, a tiny random model, a stand-in reward with signal.

    PYTHONPATH=$PWD python tests/trainer_golden.py          # print each case's digest
    PYTHONPATH=$PWD python tests/trainer_golden.py --write  # rewrite tests/data/trainer_golden.json

Each case's record is its per-step metrics (every value that does not measure time, exactly: JSON keeps
a float's every bit) and the sha256 of the final parameters' bytes. The record was made from the
trainer before `rollout.mode: partial` existed; tests/test_trainer_golden.py checks that sync mode still
gives those bits. A metric added later is not in the record and is not compared; every recorded one is.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from unittest import mock

import torch
# tests/ is on sys.path: the folder of a script run as a script, and pytest puts it there too
from engine_utils import ByteTokenizer, tiny_model
from test_engine_stress import EchoExecutor

from cir.config import load_config
from cir.rl import trainer as trainer_module

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "trainer_golden.json")
BASE = ["--train.steps", "2", "--train.prompts_per_step", "4", "--rollout.n", "3", "--rollout.max_response_tokens",
        "12", "--rollout.prompt_mode", "plain", "--train.save_every", "0", "--train.autocast", "off",
        "--engine.num_kv_blocks", "128", "--engine.show_progress", "false", "--optim.lr", "1e-3"]
CASES = {
    "one_mini_batch": ["--rl.mini_batches", "1", "--rollout.tool_budget", "{0: 0}"],
    "two_mini_batches_filtered": ["--rl.mini_batches", "2", "--rollout.tool_budget", "{0: 0}"],
    "kl_rloo_tools": ["--rl.mini_batches", "2", "--rl.kl_coef", "0.01", "--rl.advantage", "rloo",
                      "--rl.filter_groups", "false", "--rollout.tool_budget", "{0: 1}"],
}
TIMING = ("time/", "throughput/")


def fake_scores(texts: list[str], answers: list[str]) -> list[float]:
    """A reward with signal for a random model: +1 when the response's byte sum is even."""
    return [1.0 if sum(t.encode()) % 2 == 0 else -1.0 for t in texts]


def run_case(name: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "p.jsonl")
        with open(data, "w") as f:
            f.write("\n".join(json.dumps({"problem": f"{i}*{i + 3}", "answer": str(i * (i + 3))}) for i in range(8)))
        cfg = load_config(None, [*BASE, *CASES[name], "--train.data", data, "--train.output_dir",
                                 os.path.join(tmp, "run")])
        model = tiny_model(seed=0)
        patches = [mock.patch.object(trainer_module, "score_many", fake_scores)]
        partial_module = sys.modules.get("cir.rl.partial")
        if partial_module is not None:
            patches.append(mock.patch.object(partial_module, "score_many", fake_scores))
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            trainer = trainer_module.Trainer(cfg, model=model, tokenizer=ByteTokenizer(), sandbox=EchoExecutor())
            trainer.train()
        rows = [json.loads(line) for line in open(os.path.join(tmp, "run", "metrics.jsonl"))]
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        h.update(key.encode() + tensor.numpy().tobytes())
    metrics = [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]
    return {"metrics": metrics, "weights_sha256": h.hexdigest()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    records = {name: run_case(name) for name in CASES}
    print(json.dumps(records, indent=1))
    if "--write" in sys.argv:
        with open(PATH, "w") as f:
            json.dump(records, f, indent=1)
            f.write("\n")
