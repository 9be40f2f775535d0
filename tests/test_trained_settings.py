"""A checkpoint is evaluated the way it was trained: the trainer writes cir.json into the model folder,
`cir.evaluate` reads it (or the run's config.yaml for an older checkpoint), a flag overrides it, and
on the same problems, n and engine seed the trainer's held-out figure and the command's agree."""
import json
import shutil
import warnings

import pytest
from engine_utils import tiny_model

from cir.config import load_config, save_config
from cir.evaluate import _parse_args, describe_settings, main
from cir.rl.evaluation import evaluate_problems
from cir.rl.trainer import Trainer
from cir.trained_settings import META_FILE, find_trained_settings, trained_settings

PROBLEMS = [{"problem": f"{i}+{i}", "answer": str(2 * i), "id": f"p{i}"} for i in range(6)]


def run_config(tmp_path, *extra: str):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / "run"), "--train.steps", "1",
        "--train.prompts_per_step", "2", "--rollout.n", "3", "--rollout.max_response_tokens", "7",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--rollout.top_p", "0.9",
        "--train.save_every", "1", "--train.held_out", "3", "--engine.show_progress", "false",
        "--engine.num_kv_blocks", "128", *extra])


def test_settings_from_cir_json_then_config_yaml_then_none(tmp_path):
    cfg = load_config(None, ["--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 1, 5: 3}",
                             "--rollout.max_response_tokens", "48", "--train.steps", "10"])
    model_dir = tmp_path / "run" / "checkpoints" / "step_000004" / "model"
    model_dir.mkdir(parents=True)
    assert find_trained_settings(model_dir) == (None, None)  # no config.yaml above: not the trainer's
    save_config(cfg, tmp_path / "run" / "config.yaml")
    settings, where = find_trained_settings(model_dir)  # an older checkpoint: the run's config at its step
    assert where == str(tmp_path / "run" / "config.yaml")
    assert (settings["prompt_mode"], settings["max_response_tokens"], settings["max_tool_calls"]) == ("plain", 48, 1)
    (model_dir / META_FILE).write_text(json.dumps(trained_settings(cfg, 7)))
    settings, where = find_trained_settings(model_dir)
    assert where == str(model_dir / META_FILE) and settings["max_tool_calls"] == 3 and settings["step"] == 7
    other = tmp_path / "downloaded" / "model"
    other.mkdir(parents=True)
    shutil.copy(tmp_path / "run" / "config.yaml", tmp_path / "downloaded" / "config.yaml")
    assert find_trained_settings(other) == (None, None)  # a config.yaml outside a run layout is not read


def test_flags_override_trained_settings(tmp_path):
    cfg = load_config(None, ["--rollout.prompt_mode", "plain", "--rollout.n", "4", "--rollout.tool_budget", "{0: 1}"])
    (tmp_path / META_FILE).write_text(json.dumps(trained_settings(cfg, 10)))
    args = _parse_args(["--data", "x.jsonl", "--model", str(tmp_path)])
    assert (args.prompt_mode, args.n, args.max_tool_calls, args.top_p) == ("plain", 4, 1, 1.0)
    assert args.sources["prompt_mode"] == str(tmp_path / META_FILE)
    assert "prompt-mode plain" in describe_settings(args) and str(tmp_path / META_FILE) in describe_settings(args)
    args = _parse_args(["--data", "x.jsonl", "--model", str(tmp_path), "--prompt-mode", "chat", "--n", "2"])
    assert (args.prompt_mode, args.n, args.max_tool_calls) == ("chat", 2, 1)
    assert args.sources["prompt_mode"] == "--prompt-mode" and args.sources["n"] == "--n"
    for mode in ("raw", "chat", "plain"):  # every prompt mode the trainer has
        assert _parse_args(["--data", "x.jsonl", "--prompt-mode", mode]).prompt_mode == mode


def test_trainer_figure_and_cir_evaluate_agree(tmp_path, smollm2_dir, monkeypatch):
    """The tiny model trained one step with the real tokenizer (so the checkpoint loads on its own);
    the held-out problems evaluated by the trainer's `evaluate_problems` with its engine reseeded to
    0, and by `python -m cir.evaluate --model <checkpoint>/model --data <run>/held_out.jsonl` (engine
    seed 0, every setting from cir.json). Each draw is seeded by (call seed, prompt index, sample,
    position), so with the same weights, prompts and call seed the two draw the same tokens: the
    metrics and every response are equal, not just close. (A batch-shape dependent rounding of a
    near-tie logit could in principle flip a draw; the engine tests pin that batching does not change
    tokens.) Another engine seed gives other responses: the comparison can fail."""
    from cir.rl import evaluation
    from cir.tokenizer import load_tokenizer

    trainer_records = []

    def spy(*args, **kwargs):  # the records behind the trainer's figure
        records, timing = real(*args, **kwargs)
        trainer_records.extend(records)
        return records, timing

    real = evaluation.rollout_records
    monkeypatch.setattr(evaluation, "rollout_records", spy)

    tokenizer = load_tokenizer(smollm2_dir)
    model = tiny_model(seed=0, vocab_size=tokenizer.vocab_size, eos_token_id=[tokenizer.eos_token_id])
    trainer = Trainer(run_config(tmp_path), model=model, tokenizer=tokenizer)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()  # saves a checkpoint: without torch.distributed's single-process warning
        assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
        trainer_records.clear()  # (train() evaluated the held-out problems before and after its step)
        trainer.engine.runner.generator.manual_seed(0)
        expected = evaluate_problems(trainer, trainer.held_out)
    finally:
        trainer.close()
    run = tmp_path / "run"
    model_dir = run / "checkpoints" / "step_000001" / "model"
    assert json.loads((model_dir / META_FILE).read_text())["prompt_mode"] == "plain"
    main(["--model", str(model_dir), "--data", str(run / "held_out.jsonl"), "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["settings"]["prompt_mode"] == "plain" and summary["settings"]["n"] == 3
    got = summary["results"]["held_out"]["metrics"]
    assert got["num_problems"] == expected["num_problems"] == 3
    for key in ("avg@3", "response/length_mean", "answer/boxed_rate", "finish/eos", "finish/length"):
        assert got.get(key, 0.0) == pytest.approx(expected.get(key, 0.0), abs=1e-12), key
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "held_out.jsonl")]
    assert [r["responses"] for r in rows] == [r["responses"] for r in trainer_records]
    assert len({text for r in rows for text in r["responses"]}) > 1  # sampled, not one constant answer
