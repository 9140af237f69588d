"""Preference-family objectives, on pairs (prompt, chosen y_w, rejected y_l)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from unitune.objectives.sft import sft
from unitune.objectives.types import PairLogps, SeqLogps


def dpo(lp: PairLogps, *, beta: float = 0.1) -> Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290, eq. 7).

    `loss = -logsigmoid(beta * (r(y_w) - r(y_l)))`, `r(y) = logp_theta(y|x) - logp_ref(y|x)`
    summed over response tokens; mean over pairs. At `pi_theta = pi_ref` it is `log 2`.
    """
    margin = lp.chosen.ratio - lp.rejected.ratio
    return -F.logsigmoid(beta * margin).mean()


def ipo(lp: PairLogps, *, beta: float = 0.1) -> Tensor:
    """IPO (Azar et al., 2023, arXiv 2310.12036, eq. 17), length-averaged as TRL `loss_type="ipo"`.

    `loss = (h - 1/(2*beta))^2` with `h = r(y_w)/|y_w| - r(y_l)/|y_l|`, the difference of the
    *length-averaged* log ratios; mean over pairs. The averaging is TRL's (confirmed there with the
    IPO authors; the paper's results use it); `beta` is the paper's regulariser tau.
    """
    h = lp.chosen.ratio / _n(lp.chosen) - lp.rejected.ratio / _n(lp.rejected)
    return (h - 1.0 / (2.0 * beta)).pow(2).mean()


def minor_dpo(lp: PairLogps, *, beta: float = 0.1) -> Tensor:
    """MinorDPO (Xie et al., 2024, arXiv 2408.09834).

    `loss = -logsigmoid(beta * (r(y_w) - max(0, r(y_l))))`, mean over pairs. Equal to DPO while
    `r(y_l) >= 0`; once the rejected response is below the reference (`r(y_l) < 0`) it is no
    longer pushed down (zero gradient through `y_l`).
    """
    margin = lp.chosen.ratio - torch.clamp(lp.rejected.ratio, min=0)
    return -F.logsigmoid(beta * margin).mean()


def simpo(lp: PairLogps, *, beta: float = 2.0, gamma: float = 0.5) -> Tensor:
    """SimPO (Meng et al., 2024, arXiv 2405.14734, eq. 6; code princeton-nlp/SimPO). No reference.

    `loss = -logsigmoid(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma)`, mean over pairs; `gamma`
    is the absolute target margin. TRL's CPOTrainer (`loss_type="simpo"`, `simpo_gamma=gamma`,
    `label_smoothing=0`) computes the same value.
    """
    margin = lp.chosen.avg_logp - lp.rejected.avg_logp
    return -F.logsigmoid(beta * margin - gamma).mean()


def orpo(lp: PairLogps, *, odds_ratio_weight: float = 0.1) -> Tensor:
    """ORPO (Hong et al., 2024, arXiv 2403.07691, eqs. 4-7; code xfactlab/orpo). No reference.

    `loss = NLL(y_w) + odds_ratio_weight * mean(-logsigmoid(log_odds(y_w) - log_odds(y_l)))`
    with `log_odds = avg_logp - log(1 - exp(avg_logp))` (odds of the length-normalised likelihood).
    `NLL(y_w)` is the token-mean NLL over the chosen *responses* of the batch, i.e. `sft` on the
    chosen; prompt tokens are never scored (as the reference code's `disable_prompt_loss`; TRL's
    ORPOTrainer instead includes prompt tokens in its NLL term). `odds_ratio_weight` is the
    paper's lambda and TRL's `beta`.
    `log(1 - exp(x))` is computed stably; `avg_logp` is capped at `-1e-6` so that a response of
    probability 1 cannot produce an infinite log-odds (a numerical guard only).
    """
    nll = sft(lp.chosen)
    log_odds_w = _log_odds(lp.chosen.avg_logp)
    log_odds_l = _log_odds(lp.rejected.avg_logp)
    return nll + odds_ratio_weight * (-F.logsigmoid(log_odds_w - log_odds_l)).mean()


def una_pair(lp: PairLogps, *, beta: float = 0.1) -> Tensor:
    """UNA on pairwise preferences (Wang et al., 2024, arXiv 2408.15339): identical to `dpo`."""
    return dpo(lp, beta=beta)


def _n(s: SeqLogps) -> Tensor:
    return s.n_tokens.clamp(min=1).to(s.logp.dtype)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (branch at -log 2, Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _log_odds(avg_logp: Tensor) -> Tensor:
    x = avg_logp.clamp(max=-1e-6)
    return x - _log1mexp(x)
