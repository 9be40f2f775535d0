"""Train a model to reason with a Python interpreter (code-integrated RL, arXiv 2505.24480).

    python train.py                                            # embedded default: SmolLM2-135M on CPU
    python train.py --config configs/cpu-small.yaml --train.steps 5
    torchrun --nproc_per_node=8 train.py --config configs/cir-qwen2.5-math-7b.yaml
    python train.py --config ... --resume                      # continue from the latest checkpoint
    python train.py --config ... --train.overwrite true        # start over in a used output_dir

Overrides are `--section.field VALUE` (see cir/config.py for every field and its meaning). A run
directory belongs to one run: starting without --resume where another run left checkpoints or
metrics is an error. A mistake (bad config, missing file, used directory) is one `error:` line;
--debug (or CIR_DEBUG=1) shows its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.yaml")


def main(argv: list[str] | None = None) -> None:
    from cir.errors import ArgumentParser

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args, overrides = parser.parse_known_args(argv)
    from cir.config import load_config

    config_path = args.config or (DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None)
    config = load_config(config_path, overrides)  # a config mistake is reported before the heavy imports
    # the sandbox server starts inside Trainer before heavy torch work; cir imports torch lazily enough
    from cir.rl.trainer import Trainer

    trainer = Trainer(config, resume=args.resume)
    try:
        trainer.train()
        if trainer.rank == 0:
            from cir.plot import plot_run

            print(f"curves: {plot_run(trainer.output_dir)}")
    finally:
        trainer.close()
    sys.stdout.flush()
    os._exit(0)  # torchrun workers can abort in interpreter teardown; everything is flushed by now


if __name__ == "__main__":
    from cir.errors import run_main

    run_main(main)
