"""The trainer in rollout.mode partial (cir/rl/partial.py) on a tiny model with a stand-in reward:
steps cut from the stream, the staleness bound, dynamic sampling topped up from the stream, per-token
versions and the proximal policy in the update, the stream's metrics."""
import contextlib
import json
from unittest import mock

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model
from test_engine_stress import EchoExecutor
from trainer_golden import fake_scores

from cir.config import load_config
from cir_kernels import linear_logprobs
from cir.rl import partial as partial_module
from cir.rl import trainer as trainer_module


def config(tmp_path, *extra):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}*{i + 3}", "answer": str(i * (i + 3))}) for i in range(40)))
    return load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "4",
        "--train.prompts_per_step", "3", "--rollout.n", "2", "--rollout.max_response_tokens", "24",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "0",
        "--train.autocast", "off", "--engine.num_kv_blocks", "256", "--engine.show_progress", "false",
        "--engine.max_num_seqs", "8", "--optim.lr", "1e-3", "--rollout.mode", "partial", *extra])


@contextlib.contextmanager
def fake_reward():
    with mock.patch.object(partial_module, "score_many", fake_scores), \
            mock.patch.object(trainer_module, "score_many", fake_scores):
        yield


def run(cfg, **kw):
    # stop on 1 byte in 16: long-tailed response lengths, so groups finish at different steps
    model = tiny_model(seed=0)
    trainer = trainer_module.Trainer(cfg, model=model, tokenizer=ByteTokenizer(), sandbox=EchoExecutor(), **kw)
    trainer.engine.eos_token_ids |= set(range(0, 256, 16))
    with fake_reward():
        trainer.train()
    rows = [json.loads(line) for line in open(cfg.train.output_dir + "/metrics.jsonl")]
    return trainer, rows


def test_partial_steps_train_on_complete_groups_within_the_staleness_bound(tmp_path):
    trainer, rows = run(config(tmp_path, "--rl.mini_batches", "1", "--rl.filter_groups", "false"))
    assert len(rows) == 4
    assert all(r["rollout/groups_kept"] == 3 and r["signal/groups"] == 3 for r in rows)
    assert all(r["staleness/max"] <= 1 for r in rows)
    assert any(r["staleness/max"] == 1 for r in rows) and any(r["rollout/carried_in"] > 0 for r in rows)
    assert all(0 < r["rollout/occupancy"] <= 1 and r["rollout/decode_steps"] > 0 for r in rows)
    assert all(r["train/num_loss_tokens"] > 0 and 0 <= r["train/is_trunc_frac"] <= 1 for r in rows)


def test_dynamic_sampling_trains_on_exactly_the_groups_with_signal(tmp_path):
    _, rows = run(config(tmp_path, "--rl.mini_batches", "2", "--rl.filter_groups", "true",
                         "--rollout.max_staleness", "0"))
    for r in rows:
        assert r["rollout/groups_kept"] == 3 and r["signal/groups_with_signal"] == 3
        assert r["rollout/groups_generated"] == 3 + r["rollout/groups_dropped"] == r["signal/groups"]
        assert r["rollout/groups_per_trained_group"] == r["rollout/groups_generated"] / 3
        assert r["staleness/max"] == 0
    assert sum(r["rollout/groups_dropped"] for r in rows) > 0  # some group had no signal and was topped up


def test_the_update_clips_against_the_proximal_policy(tmp_path):
    """With several mini-batches the proximal log-probs come from one forward before the first optimizer
    step. Reference: a full forward of the weights as they were then (float32: ~1e-5 apart); they equal
    the behaviour log-probs on the current version's tokens and differ on older ones."""
    cfg = config(tmp_path, "--rl.mini_batches", "2", "--rl.filter_groups", "false", "--train.steps", "3")
    gaps = {"current": [], "stale": []}
    original = partial_module.PartialRollout.proximal_logprobs

    def spy(self, trajs, groups):
        model, step = self.trainer.model, self.trainer.step
        out = original(self, trajs, groups)
        for i in (g * 2 + j for g in groups for j in range(2)):
            tr = trajs[i]
            ids = tr.prompt_ids + tr.response_ids
            with torch.no_grad():
                hidden = model.forward_packed(torch.tensor(ids), torch.tensor([0, len(ids)], dtype=torch.int32))
                start = len(tr.prompt_ids) - 1
                ref = linear_logprobs(hidden[start: start + len(tr.response_ids)], model.lm_head_weight,
                                      torch.tensor(tr.response_ids))
            assert (out[i] - ref).abs().max() < 1e-4
            for v, m, prox, mu in zip(tr.versions, tr.loss_mask, out[i].tolist(), tr.logprobs, strict=True):
                if m:
                    gaps["current" if v == step else "stale"].append(abs(prox - mu))
        return out
    with mock.patch.object(partial_module.PartialRollout, "proximal_logprobs", spy):
        run(cfg)
    assert gaps["current"] and max(gaps["current"]) < 1e-4
    assert gaps["stale"] and max(gaps["stale"]) > 1e-3  # the weights changed since those were sampled


def test_partial_mode_rejects_what_it_cannot_honour(tmp_path):
    with pytest.raises(ValueError, match="recompute_old_logprobs"):
        config(tmp_path, "--rl.recompute_old_logprobs", "true")
    with pytest.raises(ValueError, match="rollout.mode must be"):
        config(tmp_path, "--rollout.mode", "async")
    with pytest.raises(ValueError, match="max_num_seqs"):
        config(tmp_path, "--rollout.n", "16")
    assert load_config(None, []).rollout.mode == "sync"
