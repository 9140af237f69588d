"""Objectives: pure loss functions on log-probs, registered by name."""

from unitune.objectives.ift import ift, ift_forward
from unitune.objectives.online import (
    best_and_worst,
    group_advantages,
    grpo,
    leave_one_out_advantages,
    online_dpo,
    pairless_groups,
    rloo,
    una_online,
    una_online_pair,
    zero_std_groups,
)
from unitune.objectives.preference import dpo, ipo, minor_dpo, orpo, simpo, una_pair
from unitune.objectives.registry import (
    DEFAULT_OBJECTIVE,
    REGISTRY,
    Objective,
    register,
    renamed_problem,
    slot_problem,
)
from unitune.objectives.sft import minor_sft, sft, uft
from unitune.objectives.types import (
    FeedbackLogps,
    PairLogps,
    RolloutLogps,
    SeqLogps,
    TokenLogps,
    desirable,
)
from unitune.objectives.unpaired import kto, una_binary, una_score

# fmt: off
register(sft, name="sft", data="demonstrations", needs_ref=False, source="standard",
         metric="f_sft", summary="mean NLL over all response tokens of the batch")
register(dpo, name="dpo", data="pairs", needs_ref=True, source="DPO, arXiv 2305.18290",
         metric="f_pref",
         summary="-logsigmoid(beta * (r(y_w) - r(y_l)))")
register(minor_sft, name="minor_sft", data="demonstrations", needs_ref=True,
         source="MinorSFT, arXiv 2408.10642",
         summary="-(2 / (beta*|y|)) * logsigmoid(beta * r(y)), mean over sequences")
register(uft, name="uft", data="demonstrations", needs_ref=True,
         source="UFT (UNA on demonstrations), ZhichaoWang970201/UNA-UFT",
         summary="(sigma(beta * r(y)) - 1)^2")
register(ipo, name="ipo", data="pairs", needs_ref=True, source="IPO, arXiv 2310.12036",
         summary="(r(y_w)/|y_w| - r(y_l)/|y_l| - 1/(2*beta))^2")
register(minor_dpo, name="minor_dpo", data="pairs", needs_ref=True,
         source="MinorDPO, arXiv 2408.09834",
         summary="-logsigmoid(beta * (r(y_w) - max(0, r(y_l))))")
register(simpo, name="simpo", data="pairs", needs_ref=False, source="SimPO, arXiv 2405.14734",
         summary="-logsigmoid(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma)")
register(orpo, name="orpo", data="pairs", needs_ref=False, source="ORPO, arXiv 2403.07691",
         renamed={"lam": "odds_ratio_weight"},
         summary="NLL(y_w) + odds_ratio_weight * -logsigmoid(log_odds(y_w) - log_odds(y_l))")
register(una_pair, name="una_pair", data="pairs", needs_ref=True, source="UNA, arXiv 2408.15339",
         metric="f_pref",
         summary="-logsigmoid(beta * (r(y_w) - r(y_l))) (= dpo)")
register(kto, name="kto", data="unpaired", needs_ref=True, inputs=("kl",), needs_labels=True,
         source="KTO, arXiv 2402.01306",
         summary="desirable 1 - sigma(beta*(r - z)), undesirable 1 - sigma(beta*(z - r))")
register(una_binary, name="una_binary", data="unpaired", needs_ref=True, needs_labels=True,
         source="UNA, arXiv 2408.15339",
         summary="(sigma(beta * r) - label)^2, or BCE of sigma(beta * r) against the label")
register(una_score, name="una_score", data="unpaired", needs_ref=True,
         source="UNA, arXiv 2408.15339", summary="(sigma(beta * r) - score)^2")
register(ift, name="ift", data="demonstrations", needs_ref=False, forward=ift_forward,
         source="IFT, arXiv 2405.11870; TsinghuaC3I/Intuitive-Fine-Tuning",
         renamed={"lam": "embed_mix"},
         summary="mix (1-embed_mix)*E(y_t) + embed_mix*E(greedy p_t) into the inputs; "
                 "sum_t l_t*w_t/T, "
                 "w_t = T*s_t/sum(s), s_t = sum_{k>=t} gamma^(k-t) l_k; mean over sequences")
# online: on prompts, the policy's own samples scored by rewards (objectives/online.py)
register(una_online, name="una_online", data="prompts", needs_ref=True, generations=1,
         unit_rewards=True, source="UNA, arXiv 2408.15339 (eq. 9); ZhichaoWang970201/UNA-UFT",
         summary="(sigma(beta * r(y)) - s(y))^2, s the reward in [0, 1]; mean over samples")
register(una_online_pair, name="una_online_pair", data="prompts", needs_ref=True,
         generations=2, min_generations=2, source="UNA, arXiv 2408.15339 (pairwise)",
         summary="(sigma(beta * (r(y+) - r(y-))) - sigma(R(y+) - R(y-)))^2, best/worst of a group")
register(online_dpo, name="online_dpo", data="prompts", needs_ref=True, generations=2,
         min_generations=2, source="Online DPO, arXiv 2402.04792; TRL OnlineDPOTrainer",
         summary="-logsigmoid(beta * (r(y+) - r(y-))) (or ipo), y+/y- best/worst of a group")
register(grpo, name="grpo", data="prompts", needs_ref=True, generations=8, min_generations=2,
         source="GRPO, arXiv 2402.03300; Dr. GRPO 2503.20783; DAPO 2503.14476; TRL GRPOTrainer",
         summary="-min(rho_t A, clip(rho_t, 1-eps, 1+eps_high) A) + beta * k3_t, "
                 "A = (R - mean_G R) / max(std_G R, 1e-4); dapo: token sum / all tokens")
register(rloo, name="rloo", data="prompts", needs_ref=True, generations=2, min_generations=2,
         source="RLOO, arXiv 2402.14740; TRL RLOOTrainer",
         summary="-min(rho A, clip(rho, 1-eps, 1+eps_high) A) per sequence, "
                 "A = R - mean_{j!=i} R_j, R = reward - beta * sum_t log(pi_old/pi_ref)")
# fmt: on

__all__ = [
    "DEFAULT_OBJECTIVE",
    "REGISTRY",
    "FeedbackLogps",
    "Objective",
    "PairLogps",
    "RolloutLogps",
    "SeqLogps",
    "TokenLogps",
    "best_and_worst",
    "desirable",
    "group_advantages",
    "leave_one_out_advantages",
    "pairless_groups",
    "register",
    "renamed_problem",
    "slot_problem",
    "zero_std_groups",
]
