"""A run's parts built as the trainer builds them, before Accelerate prepares the model: for the
tests that drive the policy or the evaluator directly."""

from __future__ import annotations

from dataclasses import dataclass

from unitune.config import Config
from unitune.eval.heldout import Ideal
from unitune.train.evaluator import Evaluator
from unitune.train.generation import Generation
from unitune.train.policy import Policy
from unitune.train.reference_set import References
from unitune.train.session import Session


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
