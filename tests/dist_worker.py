"""Worker for tests/test_distributed.py: two policy updates on fixed trajectories, weights saved.

    torchrun --nproc_per_node=2 tests/dist_worker.py --parallel ddp --out DIR
    python tests/dist_worker.py --out DIR            # the 1-rank reference
(with tests/ on PYTHONPATH, for engine_utils)

Each rank takes its contiguous share of the prompt groups (as the trainer's loader does), so a run
on any number of ranks sees the same data; the weights must come out the same.
"""
import argparse
import json
import os
import random

import torch


def synthetic_batch(num_groups: int, n: int, seed: int = 0):
    from cir.engine import Trajectory

    rng = random.Random(seed)
    trajs, rewards = [], []
    for g in range(num_groups):
        prompt = [rng.randrange(256) for _ in range(rng.randint(3, 9))]
        row = []
        for j in range(n):
            length = rng.randint(2, 12)
            mask = [1 if rng.random() > 0.2 else 0 for _ in range(length)]
            trajs.append(Trajectory(
                prompt_ids=prompt, response_ids=[rng.randrange(256) for _ in range(length)], loss_mask=mask,
                logprobs=[-rng.uniform(3, 7) * m for m in mask], num_tool_calls=0, num_tool_successes=0,
                finish_reason="eos", text="", prompt_index=g, sample_index=j))
            row.append(rng.choice([1.0, -1.0]))
        rewards.append(row)
    return trajs, torch.tensor(rewards)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", default="ddp")
    parser.add_argument("--agg", default="token_mean")
    parser.add_argument("--out", required=True)
    parser.add_argument("--groups", default="", help="FIRST:END: train on these prompt groups only, one rank "
                        "(what a rank whose gradients are never synchronised would compute)")
    args = parser.parse_args()
    from engine_utils import ByteTokenizer, tiny_model

    from cir.config import load_config
    from cir.rl import distributed
    from cir.rl.trainer import Trainer

    data = os.path.join(args.out, "data.jsonl")
    if not os.path.exists(data):
        with open(data, "w") as f:
            f.write(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    config = load_config(None, [
        "--train.data", data, "--train.output_dir", os.path.join(args.out, "run"), "--train.parallel", args.parallel,
        "--train.micro_batch_tokens", "40", "--rollout.tool_budget", "{0: 0}", "--rollout.n", "2",
        "--optim.lr", "1e-2", "--rl.mini_batches", "2", "--train.prompts_per_step", "2",
        "--engine.num_kv_blocks", "64", "--rl.loss_agg", args.agg,
    ])
    trainer = Trainer(config, model=tiny_model(seed=0), tokenizer=ByteTokenizer())
    # a real rollout first (under FSDP2 it runs on parameters unsharded in place), then updates on
    # fixed data split unevenly (rank 0: 6 groups, rank 1: 2), so ranks run different micro-batch counts
    problems = [type("P", (), {"id": str(i), "problem": f"{i}+{i}", "answer": str(2 * i), "messages": None})()
                for i in range(2)]
    rolled, _, _ = trainer.rollout(problems)
    assert len(rolled) == 4 and all(t.response_ids for t in rolled)
    trajs, rewards = synthetic_batch(num_groups=8, n=2)
    bounds = [0, 8] if trainer.world_size == 1 else [0, 6, 8]
    groups = range(bounds[trainer.rank], bounds[trainer.rank + 1])
    if args.groups:
        groups = range(*map(int, args.groups.split(":")))
    mine = [trajs[g * 2 + j] for g in groups for j in range(2)]
    lrs = []  # the learning rate of every optimizer step: the size of the update, for the test's tolerance
    trainer.optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(max(g["lr"] for g in opt.param_groups)))
    for _ in range(2):
        trainer.update(mine, rewards[list(groups)])
    state = distributed.full_state_dict(trainer.model)
    if state:
        tag = (f"{args.parallel}_{args.agg}_w{trainer.world_size}_r{trainer.rank}"
               f"{'_g' + args.groups if args.groups else ''}")
        torch.save(state, os.path.join(args.out, f"weights_{tag}.pt"))
        mc = trainer.model.config
        update = {"lrs": lrs, "num_tokens": sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs),
                  "width": max(mc.hidden_size, mc.intermediate_size, mc.vocab_size)}
        with open(os.path.join(args.out, f"update_{tag}.json"), "w") as f:
            json.dump(update, f)
    distributed.finish()
    os._exit(0)


if __name__ == "__main__":
    main()
