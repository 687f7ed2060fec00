"""Plans (where an inference runs), their cost, and — later — the policy that picks one."""

from tierwise.planner.plans import Cascade, Local, Plan, Remote

__all__ = ["Cascade", "Local", "Plan", "Remote"]
