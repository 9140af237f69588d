"""Rewards for online training: several reward functions with weights behind one interface
(`build_rewards` -> `Rewards.score` -> `RewardScores`), and the shaping of the combined reward
(`shaping.py`: missing-EOS penalty, clipping, UNA's map to [0, 1]).

Spec forms (`specs.py`): `module:function` and `path.py:function` (TRL's reward-function
signature, `base.py`), `rm:PATH_OR_ID` (a one-output reward model, re-tokenised text),
`judge:SPEC` (a pointwise judge of `unitune.judges`), `format:REGEX`, `length:N`
(`programmatic.py`).
"""

from unitune.rewards.base import (
    RewardError,
    RewardProgress,
    RewardScores,
    RewardSpecError,
)
from unitune.rewards.programmatic import PROGRAMMATIC, Programmatic
from unitune.rewards.scoring import Reward, Rewards, build_rewards
from unitune.rewards.shaping import UNA_MAPS, RunningStats, clip, missing_eos, shape, una_map
from unitune.rewards.specs import (
    REFERENCE_COLUMNS,
    RewardSpec,
    parse_reward_spec,
    rewards_fingerprint,
)

__all__ = [
    "PROGRAMMATIC",
    "REFERENCE_COLUMNS",
    "UNA_MAPS",
    "Programmatic",
    "Reward",
    "RewardError",
    "RewardProgress",
    "RewardScores",
    "RewardSpec",
    "RewardSpecError",
    "Rewards",
    "RunningStats",
    "build_rewards",
    "clip",
    "missing_eos",
    "parse_reward_spec",
    "rewards_fingerprint",
    "shape",
    "una_map",
]
