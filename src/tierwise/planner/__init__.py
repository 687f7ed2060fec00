"""Plans (where an inference runs), the estimators, the policy that picks a plan, and cost."""

from tierwise.planner.plans import Cascade, Local, Plan, Remote, Split
from tierwise.planner.policy import SLO, Decision

__all__ = ["SLO", "Cascade", "Decision", "Local", "Plan", "Remote", "Split"]
