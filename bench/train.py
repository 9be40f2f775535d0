"""The training side, timed. Two benchmarks:

    python bench/train.py                                   # one RL step, CPU: SmolLM2-135M, the embedded default
    python bench/train.py --steps 3 --prompts 4 --n 4 --max-tokens 256
    torchrun --nproc_per_node=8 bench/train.py --config configs/cir-qwen2.5-math-7b.yaml --model.path ...

    python bench/train.py --update                          # the policy update alone (CUDA: 1.5B and 3B shapes)
    python bench/train.py --update --smoke                  # tiny shapes on CPU (a smoke run, ~1 min)
    python bench/train.py --update --shapes qwen2.5-1.5b --precisions fp32-autocast --micro-tokens 16384
    python bench/train.py --update --fsdp                   # through FSDP2 at world size 1 (NCCL / gloo)
    python bench/train.py --update --compile off on         # also with each block's norms + MLP compiled

RL step: the real trainer (engine rollouts, sandbox calls, rewards, the policy update) for a few
steps; per step after the first (warm-up): seconds in generation / waiting on the sandbox / reward /
training, rollout tokens/s, training tokens/s and, on CUDA, the training MFU.

Update (`--update`): `Trainer.update` over one fixed packed
batch of trajectories with real shapes (prompts 100-400 tokens, responses lognormal around 1100
tokens up to 4096, interpreter-feedback spans masked), on a random-weight model built on the
device, for each precision (fp32 masters + bf16 autocast, bf16 parameters), gradient checkpointing
off / on, micro-batch token budget. Reports tokens/s and MFU = (6 x parameters x tokens + causal
attention FLOPs) / time / bf16 dense peak (also `mfu_exact`: the LM head counted on the scored rows
only, the embedding lookup as free), peak memory, the host synchronisations torch reports in one update
(`set_sync_debug_mode`; the count must not grow with the number of micro-batches), and the split of an
update into model forward / log-prob forward / loss / log-prob + loss backward / model backward /
optimizer, timed with CUDA events in a second pass of the same code (no host sync inside it). On CPU:
tokens/s, MFU owed.
The last line is one JSON object.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/train.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.train, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.train", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path})

import argparse
import contextlib
import functools
import json
import math
import random
import statistics
import tempfile
import time

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "B200": 2250e12}


# ------------------------------------------------------------------ the policy update alone
# Qwen2.5 shapes (config.json of the HF checkpoints); the weights are random, built on the device.
SHAPES = {
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2),
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
}
PRECISIONS = {"fp32-autocast": ("float32", "bf16"), "bf16": ("bfloat16", "off")}


def model_config(shape: str):
    from cir.model.config import ModelConfig

    fields = dict(model_type="qwen2", vocab_size=151936, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6,
                  rope_scaling=None, max_position_embeddings=32768, tie_word_embeddings=True, attention_bias=True,
                  qk_norm=False, bos_token_id=None, eos_token_id=[151643], pad_token_id=None)
    fields.update(SHAPES[shape])
    if shape == "tiny":
        fields["head_dim"] = 16
    return ModelConfig(**fields)


def build_model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """A random-weight model of `shape`, initialised on the device (std 0.02, norms 1)."""
    from cir.model.transformer import Transformer

    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(model_config(shape))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.to(dtype)


class _StubTokenizer:
    """What the Trainer's engine needs of a tokenizer; the update never tokenizes."""

    def __init__(self, vocab_size: int, eos: int):
        self.vocab_size, self.eos_token_id, self.eos_token_ids = vocab_size, eos, [eos]

    def encode(self, text: str) -> list[int]:
        return [b % self.vocab_size for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


def trajectory_batch(num_tokens: int, vocab_size: int, n: int = 8, seed: int = 0, max_response: int = 4096,
                     prompt_range: tuple[int, int] = (100, 400)) -> tuple[list, torch.Tensor]:
    """Groups of n trajectories with the paper's shapes until ~num_tokens packed tokens; rewards [G, n] mixed.

    Prompt lengths uniform in prompt_range; responses lognormal (median 1100, sigma 0.6) in
    [32, max_response]; 0-3 interpreter-feedback spans of 20-120 tokens per response (mask 0)."""
    from cir.engine import Trajectory

    rng = random.Random(seed)
    trajs, rewards, total = [], [], 0
    while total < num_tokens or not trajs:
        prompt = [rng.randrange(vocab_size) for _ in range(rng.randint(*prompt_range))]
        group = []
        for j in range(n):
            length = int(min(max(rng.lognormvariate(math.log(1100), 0.6), 32), max_response))
            mask = [1] * length
            for _ in range(rng.randint(0, 3)):
                start, span = rng.randrange(length), rng.randint(20, 120)
                mask[start:start + span] = [0] * len(mask[start:start + span])
            response = [rng.randrange(vocab_size) for _ in range(length)]
            trajs.append(Trajectory(prompt_ids=prompt, response_ids=response, loss_mask=mask,
                                    logprobs=[-rng.random() * 3 if m else 0.0 for m in mask], num_tool_calls=0,
                                    num_tool_successes=0, finish_reason="eos", text=""))
            total += len(prompt) + length
            group.append(1.0 if (j % 2 == 0) else -1.0)
        rewards.append(group)
    return trajs, torch.tensor(rewards)


def update_flops(model: torch.nn.Module, trajs: list) -> dict:
    """FLOPs of one update (forward + backward, no recompute): 'formula' = 6 x params x tokens + causal
    attention; 'exact' = the LM head only on the scored (response) rows, the embedding lookup free."""
    cfg = model.config
    num_params = sum(p.numel() for p in model.parameters())
    head = cfg.vocab_size * cfg.hidden_size
    embed_and_head = head if cfg.tie_word_embeddings else 2 * head
    tokens = sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    rows = sum(len(t.response_ids) for t in trajs)
    sq = sum((len(t.prompt_ids) + len(t.response_ids)) ** 2 for t in trajs)
    attention = 6 * sq * cfg.num_attention_heads * cfg.head_dim * cfg.num_hidden_layers  # fwd 2 L^2 H d, bwd 2x
    return {"params": num_params, "tokens": tokens, "scored_rows": rows, "attention": attention,
            "formula": 6 * num_params * tokens + attention,
            "exact": 6 * (num_params - embed_and_head) * tokens + 6 * head * rows + attention}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class _Clock:
    """Phase marks: CUDA events (no host sync until read) or perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def split(self) -> dict[str, float]:
        """Seconds per phase name, summed: each mark closes the phase named by it."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:], strict=False):
            seconds = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + seconds
        return out


def split_update(trainer, trajs: list, rewards: torch.Tensor) -> dict[str, float]:
    """One update through the trainer's own pieces with phase marks: model forward, log-prob forward,
    loss, log-prob + loss backward (until the hidden states' gradient), model backward, optimizer."""
    from cir.model.attention import VarlenContext
    from cir.rl.batching import pack
    from cir.rl.loss import policy_loss
    from cir_kernels import linear_logprobs

    rl, model = trainer.config.rl, trainer.model
    adv = trainer.advantages(rewards).reshape(-1).tolist()
    micro = [mb.to(trainer.device) for mb in pack(trajs, adv, trainer.config.train.micro_batch_tokens)]
    num_tokens = float(sum(mb.num_loss_tokens for mb in micro))
    clock = _Clock(trainer.device)
    clock.mark("start")
    for mb in micro:
        with trainer._autocast():
            ctx = VarlenContext(mb.cu_seqlens, max(mb.seq_lens), mb.seq_lens)
            hidden = model.forward_hidden(mb.input_ids, mb.positions, ctx)[mb.rows]
            clock.mark("model forward")
            hidden.register_hook(lambda g: clock.mark("log-prob + loss backward"))
            weight = model.lm_head_weight
            dtype = torch.bfloat16 if trainer.autocast else weight.dtype
            logp, entropy = linear_logprobs(hidden.to(dtype), weight.to(dtype), mb.targets, mask=mb.mask,
                                            return_entropy=True, check_targets=False)
            clock.mark("log-prob forward")
            loss, _ = policy_loss(logp, mb.old_logprobs, mb.advantages, mb.mask, clip_low=rl.clip_low,
                                  clip_high=rl.clip_high, agg=rl.loss_agg, seq_ids=mb.seq_ids, entropy=entropy,
                                  num_tokens=num_tokens, num_seqs=float(len(trajs)), num_seq_ids=mb.num_seqs)
            clock.mark("loss")
            loss.backward()
            clock.mark("model backward")
    torch.nn.utils.clip_grad_norm_(trainer.policy.parameters(), trainer.config.optim.grad_clip)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    clock.mark("optimizer")
    return clock.split()


def count_cuda_syncs(fn) -> int:
    """Host synchronisations torch reports (set_sync_debug_mode warnings) during fn(): an update has a
    fixed few (advantages, statistics and grad norm once), none per micro-batch."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def compile_blocks(model: torch.nn.Module) -> None:
    """torch.compile, in place (parameter names kept), of each block's norms and SwiGLU MLP: the
    elementwise passes they fuse (fp32 norm statistics, silu * up) and nothing that sees the attention
    context (its host lists would be guarded on). Dynamic shapes: the token count moves per micro-batch."""
    for layer in model.layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            module.compile(dynamic=True)


def bench_update(shape: str, precision: str, checkpointing: bool, micro_tokens: int, trajs: list,
                 rewards: torch.Tensor, device: torch.device, steps: int, parallel: str = "none",
                 compile: bool = False) -> dict:
    """Time `Trainer.update` (steps after one warm-up) for one setting; then one split pass."""
    from cir.config import load_config
    from cir.rl.trainer import Trainer

    param_dtype, autocast = PRECISIONS[precision]
    row = {"shape": shape, "precision": precision, "checkpointing": checkpointing, "micro_tokens": micro_tokens,
           "parallel": parallel, "compile": compile}
    trainer = None
    try:
        model = build_model(shape, device, getattr(torch, param_dtype))
        if compile:
            compile_blocks(model)
        flops = update_flops(model, trajs)
        config = load_config(None, [
            "--model.gradient_checkpointing", str(checkpointing).lower(), "--train.autocast", autocast,
            "--train.micro_batch_tokens", str(micro_tokens), "--rl.mini_batches", "1", "--rollout.n", "8",
            "--rollout.tool_budget", "{0: 0}", "--train.save_every", "0", "--engine.num_kv_blocks", "16",
            "--train.output_dir", tempfile.mkdtemp(prefix="cir-bench-update-"), "--engine.show_progress", "false",
            "--train.parallel", parallel if parallel != "none" else "ddp", "--optim.lr", "1e-6",
        ])
        trainer = Trainer(config, model=model, tokenizer=_StubTokenizer(model.config.vocab_size, 0))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.update(trajs, rewards)  # warm-up: allocator, Triton compilation, optimizer state
        _sync(device)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            trainer.update(trajs, rewards)
            _sync(device)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        if device.type == "cuda":
            row["cuda_syncs_per_update"] = count_cuda_syncs(functools.partial(trainer.update, trajs, rewards))
        peak = peak_flops(device)
        row.update(seconds=seconds, tokens_per_s=flops["tokens"] / seconds, tokens=flops["tokens"],
                   scored_rows=flops["scored_rows"], params=flops["params"],
                   mfu=flops["formula"] / seconds / peak if peak else None,
                   mfu_exact=flops["exact"] / seconds / peak if peak else None,
                   peak_memory_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
        if parallel == "none":
            row["split_s"] = split_update(trainer, trajs, rewards)
    except torch.OutOfMemoryError:
        row["error"] = "OOM"
    finally:
        if trainer is not None:
            trainer.close()
        del trainer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


@contextlib.contextmanager
def _world_of_one(device: torch.device):
    """A process group of one (NCCL on CUDA, gloo on CPU): the Trainer then wraps with FSDP2."""
    import torch.distributed as dist

    extra = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1,
                            init_method="tcp://127.0.0.1:29517", **extra)
    try:
        yield
    finally:
        if dist.is_initialized():  # Trainer.close() ends it already
            dist.destroy_process_group()


def update_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description="the policy update alone (bench/train.py --update)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (or wherever torch runs)")
    parser.add_argument("--shapes", nargs="+", default=None, choices=sorted(SHAPES))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--micro-tokens", nargs="+", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=None, help="packed tokens per update (default 131072)")
    parser.add_argument("--steps", type=int, default=3, help="timed updates per setting, after one warm-up")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 at world size 1 (NCCL on CUDA): a smoke run")
    parser.add_argument("--compile", nargs="+", default=["off"], choices=["off", "on"],
                        help="torch.compile of each block's norms and MLP (compile_blocks), off and / or on")
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
    shapes = args.shapes or (["tiny"] if args.smoke else ["qwen2.5-1.5b", "qwen2.5-3b"])
    micro_tokens = args.micro_tokens or ([512, 2048] if args.smoke else [8192, 16384, 32768])
    tokens = args.tokens or (4096 if args.smoke else 131072)
    rows = []
    _print_header()
    for shape in shapes:
        vocab = model_config(shape).vocab_size
        trajs, rewards = trajectory_batch(tokens, vocab, max_response=1024 if args.smoke else 4096,
                                          prompt_range=(20, 100) if args.smoke else (100, 400))
        for precision in args.precisions:
            for ckpt in args.checkpointing:
                for mt in micro_tokens:
                    for comp in args.compile:
                        with _world_of_one(device) if args.fsdp else contextlib.nullcontext():
                            rows.append(bench_update(shape, precision, ckpt == "on", mt, trajs, rewards, device,
                                                     args.steps, "fsdp" if args.fsdp else "none", comp == "on"))
                        _print_row(rows[-1])
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(json.dumps({"bench": "train_update", "device": where, "rows": rows,
                      "mfu_owed": device.type != "cuda" or None}))
    os._exit(0)


def _print_header() -> None:
    print(f"{'shape':<14}{'precision':<17}{'ckpt':<6}{'micro':>7}{'tokens/s':>11}{'MFU':>7}{'exact':>7}{'GiB':>7}"
          f"{'syncs':>6}"
              "  split: fwd / lp fwd / loss / lp bwd / bwd / optim (s)")


def _print_row(r: dict) -> None:
    precision = r["precision"] + ("+c" if r.get("compile") else "")  # +c: compile_blocks
    if "error" in r:
        print(f"{r['shape']:<14}{precision:<17}{str(r['checkpointing']):<6}{r['micro_tokens']:>7}  {r['error']}")
        return
    pct = lambda x: f"{100 * x:.1f}%" if x is not None else "owed"  # noqa: E731
    gib = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else "-"
    split = " / ".join(f"{v:.3f}" for v in r.get("split_s", {}).values())
    print(f"{r['shape']:<14}{precision:<17}{str(r['checkpointing']):<6}{r['micro_tokens']:>7}"
          f"{r['tokens_per_s']:>11.0f}{pct(r['mfu']):>7}{pct(r['mfu_exact']):>7}{gib:>7}"
          f"{r.get('cuda_syncs_per_update', '-'):>6}  {split}", flush=True)


def main() -> None:
    if "--update" in sys.argv[1:]:
        update_main([a for a in sys.argv[1:] if a != "--update"])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--steps", type=int, default=3, help="steps to run; the first is warm-up")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=192)
    parser.add_argument("--update", action="store_true", help="benchmark the policy update alone (see above)")
    args, overrides = parser.parse_known_args()
    from cir.config import load_config
    from cir.rl.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="cir-bench-train-")
    config = load_config(args.config or os.path.join(root, "configs", "default.yaml"), [
        "--train.steps", str(args.steps), "--train.prompts_per_step", str(args.prompts), "--rollout.n", str(args.n),
        "--rollout.max_response_tokens", str(args.max_tokens), "--train.save_every", "0",
        "--train.output_dir", out, "--engine.show_progress", "false",
        "--rl.filter_groups", "false",  # time the update even when no group has signal (untrained model)
        *overrides,
    ])
    trainer = Trainer(config)
    rows = []
    try:
        for _ in range(args.steps):
            rows.append(trainer.train_step())
    finally:
        trainer.close()
    timed = rows[1:] or rows
    keys = ["time/generate", "time/sandbox_wait", "time/reward", "time/train", "time/rollout"]
    split = {k: statistics.mean(r[k] for r in timed) for k in keys}
    rollout_tps = statistics.mean(r["throughput/rollout_tokens_per_s"] for r in timed)
    train_tps = statistics.mean(r["throughput/train_tokens_per_s"] for r in timed)
    device = trainer.device
    num_params = sum(p.numel() for p in trainer.model.parameters())
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        mfu = 6 * num_params * train_tps / peak if peak else None
    step_s = split["time/rollout"] + split["time/train"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, {num_params / 1e6:.0f}M parameters, {args.prompts} prompts x {args.n} samples, "
          f"<= {args.max_tokens} tokens, mean of {len(timed)} step(s) after warm-up")
    print(f"{'part':<22}{'seconds':>10}{'share':>9}")
    for name, key in [("generation", "time/generate"), ("  of which sandbox wait", "time/sandbox_wait"),
                      ("reward", "time/reward"), ("training", "time/train")]:
        print(f"{name:<22}{split[key]:>10.2f}{split[key] / step_s:>9.0%}")
    print(f"rollout {rollout_tps:.1f} tokens/s, training {train_tps:.1f} tokens/s"
          + (f", MFU {mfu:.1%}" if mfu is not None else ""))
    print(json.dumps({"device": where, "params": num_params, "split_s": split, "step_s": step_s,
                      "rollout_tokens_per_s": rollout_tps, "train_tokens_per_s": train_tps, "mfu": mfu}))
    os._exit(0)


if __name__ == "__main__":
    main()
