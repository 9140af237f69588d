"""A run's parts built as the trainer builds them, before Accelerate prepares the model: for the
tests that drive the policy or the evaluator directly."""

from __future__ import annotations

from dataclasses import dataclass

from unitune.config import Config
from unitune.eval.heldout import Ideal
from unitune.training.evaluator import Evaluator
from unitune.training.generation import Generation
from unitune.training.policy import Policy
from unitune.training.reference_set import References
from unitune.training.session import Session


@dataclass(frozen=True)
class Parts:
    session: Session
    refs: References
    policy: Policy
    evaluator: Evaluator


def build(cfg: Config, ideal: Ideal | None = None) -> Parts:
    session = Session(cfg)
    generation = Generation(session) if cfg.eval.generate else None
    refs = References(session)
    policy = Policy(session, session.logps, refs)
    return Parts(session, refs, policy, Evaluator(policy, ideal or Ideal(), generation))
