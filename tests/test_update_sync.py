"""The policy update reads nothing back from the device per micro-batch.

On CUDA every read of a device value (`.item()`, `float(t)`, `bool(t)`, `.tolist()`, `.cpu()`,
`nonzero()`, ...) stalls the host until the GPU drains its queue, so the micro-batch loop must not
do any. On CPU the same calls are counted: aten ops that produce a host value or a data-dependent
shape through a TorchDispatchMode (it sees forward and backward, autograd runs on this thread), and
the Python-level `Tensor.tolist` / `.cpu` / `.numpy` / `.item`, which can bypass the dispatcher on
CPU. The count for one `Trainer.update` must not grow with the number of micro-batches.
"""
import json

import pytest
import torch
from engine_utils import ByteTokenizer, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

from cir.config import load_config
from cir.engine import Trajectory
from cir.rl.batching import pack
from cir.rl.trainer import Trainer

_SYNCING_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # item / float / int / bool of a tensor
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
    torch.ops.aten.unique_consecutive.default,
    torch.ops.aten._unique2.default,
}
_HOST_METHODS = ("tolist", "cpu", "numpy", "item")


class _CountReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _SYNCING_OPS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _count_update_reads(trainer: Trainer, trajs: list, rewards: torch.Tensor,
                        monkeypatch) -> tuple[list[str], list[str], dict]:
    """(all reads of one update, the reads between entering the micro-batch loop and the optimizer step, stats)."""
    counter = _CountReads()
    for name in _HOST_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            counter.reads.append(f"Tensor.{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    marks = {}
    policy_step, optimizer_step = trainer._policy_step, trainer.optimizer.step

    def marked_policy_step(*args, **kwargs):
        marks["loop"] = len(counter.reads)
        return policy_step(*args, **kwargs)

    def marked_optimizer_step(*args, **kwargs):
        marks["step"] = len(counter.reads)
        return optimizer_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "_policy_step", marked_policy_step)
    monkeypatch.setattr(trainer.optimizer, "step", marked_optimizer_step)
    with counter:
        stats = trainer.update(trajs, rewards)
    monkeypatch.undo()
    return counter.reads, counter.reads[marks["loop"]:marks["step"]], stats


def _trajectories(num_groups: int, n: int) -> tuple[list[Trajectory], torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    trajs = []
    for g in range(num_groups):
        for j in range(n):
            num_prompt, num_response = 5 + g, 6 + 3 * j
            mask = [1] * num_response
            mask[2] = 0  # one interpreter-feedback token per response
            trajs.append(Trajectory(
                prompt_ids=torch.randint(0, 256, (num_prompt,), generator=gen).tolist(),
                response_ids=torch.randint(0, 256, (num_response,), generator=gen).tolist(),
                loss_mask=mask, logprobs=[-2.0 if m else 0.0 for m in mask], num_tool_calls=0,
                num_tool_successes=0, finish_reason="eos", text=""))
    rewards = torch.tensor([[1.0, -1.0, -1.0]] * num_groups)[:, :n]
    return trajs, rewards


def _trainer(tmp_path, micro_batch_tokens: int, agg: str, kl_coef: float) -> Trainer:
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}+{i}", "answer": str(2 * i)}) for i in range(4)))
    cfg = load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(tmp_path / f"run{micro_batch_tokens}"),
        "--train.steps", "1", "--rollout.n", "3", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "0",
        "--engine.num_kv_blocks", "64", "--engine.show_progress", "false", "--rl.mini_batches", "1",
        "--train.micro_batch_tokens", str(micro_batch_tokens), "--rl.loss_agg", agg, "--rl.kl_coef", str(kl_coef),
        "--rl.entropy_coef", "0.01",
    ])
    return Trainer(cfg, model=tiny_model(seed=0), tokenizer=ByteTokenizer())


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step")
@pytest.mark.parametrize("agg,kl_coef", [("token_mean", 0.0), ("seq_mean_token_mean", 0.01)])
def test_update_reads_do_not_grow_with_micro_batches(tmp_path, monkeypatch, agg, kl_coef):
    trajs, rewards = _trajectories(num_groups=4, n=3)  # 12 trajectories of 11..20 tokens
    counts, stats = {}, {}
    for budget in (1000, 24):  # one micro-batch; one or two trajectories per micro-batch
        trainer = _trainer(tmp_path, budget, agg, kl_coef)
        try:
            num_micro = len(pack(trajs, [0.0] * len(trajs), budget))
            reads, in_loop, stats[budget] = _count_update_reads(trainer, trajs, rewards, monkeypatch)
            counts[budget] = (num_micro, reads)
        finally:
            trainer.close()
        # forward, loss, backward of every micro-batch and the gradient clipping: nothing read back
        assert in_loop == [], f"{budget}-token micro-batches: {in_loop}"
    (one, reads_one), (many, reads_many) = counts[1000], counts[24]
    assert one == 1 and many >= 8
    # what remains (advantages, which groups have signal, the statistics and grad norm once, CPU AdamW's
    # per-parameter step counts) is once per update, not once per micro-batch
    assert reads_many == reads_one, f"{one} micro-batch: {reads_one}; {many} micro-batches: {reads_many}"
    # the same update either way (global normalisers): statistics agree to float tolerance
    for k in ("num_loss_tokens", "pg_loss", "entropy", "clip_frac", "grad_norm"):
        assert stats[24][k] == pytest.approx(stats[1000][k], rel=1e-4, abs=1e-6), k
