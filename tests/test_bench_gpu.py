"""bench/gpu.py: the GPU suite's smoke run (every part at tiny shapes on CPU) and its runner.

    pytest tests/test_bench_gpu.py
"""
import json
import os
import subprocess
import sys
import time

from bench import gpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_prints_one_json_line_per_part_then_the_summary():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]  # stdout holds JSON lines only
    parts, summary = lines[:-1], lines[-1]
    assert [p["part"] for p in parts] == list(gpu.PARTS)
    for part in parts:
        assert "error" not in part and "skipped" not in part, json.dumps(part)[:3000]
    assert summary["summary"] is True and summary["device"] == "cpu" and summary["torch"]
    assert summary["parts"] == {name: "ok" for name in gpu.PARTS}
    # a few figures each part must carry (the names bench/RESULTS.md quotes)
    by_name = {p["part"]: p for p in parts}
    assert by_name["rollout"]["eager_tokens_per_s"] > 0 and by_name["rollout"]["transformers_tokens_per_s"] > 0
    assert {r["impl"] for r in by_name["paged_attention"]["rows"]} == {"torch", "triton"}
    assert [r["batch"] for r in by_name["sampler"]["rows"]] == [1, 4]
    assert by_name["linear_logprobs"]["rows"][0]["kernel_ms"] > 0
    assert by_name["rl_step"]["train_tokens_per_s"] > 0 and not by_name["rl_step"]["update_skipped"]
    assert [r["precision"] for r in by_name["update"]["rows"]] == ["fp32-autocast", "bf16"]
    assert by_name["decode_profile"]["python_calls_per_step"] > 0


def _boom(ctx):
    raise ZeroDivisionError("part failed on purpose")


def _slow(ctx):
    time.sleep(60)


def test_a_failing_or_hanging_part_is_reported_and_bounded(monkeypatch):
    monkeypatch.setitem(gpu.PARTS, "boom", (_boom, 5))
    monkeypatch.setitem(gpu.PARTS, "slow", (_slow, 5))
    out = gpu.run_part("boom", True, 30)
    assert out["part"] == "boom" and "ZeroDivisionError: part failed on purpose" in out["error"]
    start = time.perf_counter()
    out = gpu.run_part("slow", True, 1)
    assert "timed out" in out["error"] and time.perf_counter() - start < 20


def test_random_models_of_published_shapes_match_their_transformers_twin():
    """bench/models.py builds the suite's models on the device (no checkpoint) and the transformers
    twin that bench/forward.py and the rollout part compare against: same architecture, same tensors,
    so the logits agree to float32 rounding (a few ulps of values ~0.1-1 after 2 layers: 1e-5)."""
    import torch

    from bench.models import SHAPES, hf_twin, random_model, tiny_shape

    for shape in SHAPES:
        model = random_model(tiny_shape(shape), torch.float32, "cpu")
        assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
        ids = torch.randint(0, model.config.vocab_size, (2, 19))
        with torch.no_grad():
            ours, theirs = model(ids).float(), hf_twin(model)(input_ids=ids).logits.float()
        assert (ours - theirs).abs().max() < 1e-5, shape
    bf16 = random_model(tiny_shape("qwen2.5-7b"), torch.bfloat16, "cpu")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
