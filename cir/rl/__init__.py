"""RL math: advantages, the clipped policy loss, the tool-budget schedule."""
from cir.rl.advantages import METHODS as ADVANTAGE_METHODS
from cir.rl.advantages import advantages, groups_with_signal
from cir.rl.budget import ToolBudget
from cir.rl.loss import AGG_MODES, KL_TYPES, kl_penalty, policy_loss

__all__ = [
    "ADVANTAGE_METHODS",
    "AGG_MODES",
    "KL_TYPES",
    "ToolBudget",
    "advantages",
    "groups_with_signal",
    "kl_penalty",
    "policy_loss",
]
