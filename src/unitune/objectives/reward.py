"""The reward model's loss: Bradley–Terry on the scores of preference pairs.

Not a policy objective (it takes scalar rewards, not log-probs), so it has no registry line: the
`reward_model` job (`training/reward_model.py`) is its only user.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def bradley_terry(r_chosen: Tensor, r_rejected: Tensor, margin: Tensor | None = None) -> Tensor:
    """Bradley–Terry pairwise loss (Bradley & Terry, 1952; Ouyang et al., 2022, arXiv 2203.02155,
    InstructGPT eq. 1; TRL's `RewardTrainer.compute_loss`).

    `P(y_w > y_l | x) = sigmoid(r(x, y_w) - r(x, y_l))`; the loss is its negative log-likelihood,
    `-logsigmoid(r_chosen - r_rejected [- margin])`, mean over pairs. `margin` (per pair, as TRL's
    `margin` column, Llama 2's eq. 2) asks the chosen to win by at least that much. At equal
    rewards it is `log 2`.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()
