"""Trainer pieces: config loading and validation, packing, one step end to end on a tiny model."""
import json

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model

from cir.config import load_config, save_config
from cir.engine import Trajectory
from cir.rl.batching import pack
from cir.rl.trainer import Trainer


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(None, ["--rl.clip_high", "0.3", "--train.steps=5", "--rollout.tool_budget", "{0: 1, 5: 2}",
                             "--model.path", "none", "--optim.betas", "[0.9, 0.95]"])
    assert (cfg.rl.clip_high, cfg.train.steps, cfg.rollout.tool_budget) == (0.3, 5, {0: 1, 5: 2})
    assert cfg.model.path is None and cfg.optim.betas == (0.9, 0.95)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    with pytest.raises(ValueError, match="unknown config field rl.clip_hgh"):
        load_config(None, ["--rl.clip_hgh", "1"])
    with pytest.raises(ValueError, match="train.steps: cannot use 'abc'"):
        load_config(None, ["--train.steps", "abc"])
    with pytest.raises(ValueError, match="unknown config section 'rlx'"):
        load_config(None, ["--rlx.a", "1"])
    with pytest.raises(ValueError, match="rl.advantage: unknown method 'ppo'"):
        load_config(None, ["--rl.advantage", "ppo"])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)
    paper = load_config(Path(__file__).parents[1] / "configs" / "cir-qwen2.5-math-7b.yaml")
    assert (paper.rl.clip_low, paper.rl.clip_high, paper.optim.lr, paper.rollout.n) == (0.2, 0.28, 1e-6, 16)
    assert paper.rollout.tool_budget == {0: 2, 100: 3, 200: 4} and paper.train.prompts_per_step == 128


def traj(prompt, response, mask, logprobs):
    return Trajectory(prompt_ids=prompt, response_ids=response, loss_mask=mask, logprobs=logprobs,
                      num_tool_calls=0, num_tool_successes=0, finish_reason="eos", text="")


def test_pack_scores_exactly_the_response_tokens():
    a = traj([1, 2, 3], [4, 5], [1, 0], [-0.5, 0.0])
    b = traj([7], [8, 9, 10], [1, 1, 1], [-1.0, -2.0, -3.0])
    (mb,) = pack([a, b], [0.5, -1.0], max_tokens=100)
    assert mb.input_ids.tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 10]
    assert mb.cu_seqlens.tolist() == [0, 5, 9]
    assert mb.rows.tolist() == [2, 3, 5, 6, 7]  # hidden at t predicts token t + 1
    assert mb.input_ids[mb.rows + 1].tolist() == mb.targets.tolist() == [4, 5, 8, 9, 10]
    assert mb.mask.tolist() == [1, 0, 1, 1, 1] and mb.advantages.tolist() == [0.5, 0.5, -1, -1, -1]
    assert [len(m.seq_ids) for m in pack([a, b], [0.5, -1.0], max_tokens=5)] == [2, 3]


@pytest.mark.parametrize("autocast", ["off", "bf16"])
def test_one_step_end_to_end(tmp_path, autocast):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}+{i}", "answer": str(2 * i)}) for i in range(4)))
    cfg = load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "1",
        "--train.prompts_per_step", "2", "--rollout.n", "3", "--rollout.max_response_tokens", "8",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "0",
        "--train.autocast", autocast, "--engine.num_kv_blocks", "64", "--engine.show_progress", "false",
        "--rl.kl_coef", "0.01", "--rl.filter_groups", "false",  # random weights: no signal, the KL term trains
    ])
    model = tiny_model(seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model=model, tokenizer=ByteTokenizer())
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(rows) == 1 and rows[0]["train/num_loss_tokens"] > 0
    assert all(isinstance(v, (int, float)) and v == v for v in rows[0].values())  # no NaN
    assert (tmp_path / "run" / "config.yaml").exists()
    changed = any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert changed == (rows[0]["reward/mean"] not in (-1.0, 1.0)) or rows[0]["train/kl"] >= 0


def test_yaml_booleans_do_not_sneak_into_string_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  autocast: off\n")
    with pytest.raises(ValueError, match="YAML boolean"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text('train:\n  autocast: "off"\n')
    assert load_config(tmp_path / "c.yaml").train.autocast == "off"
    assert load_config(None, ["--train.autocast", "off"]).train.autocast == "off"
