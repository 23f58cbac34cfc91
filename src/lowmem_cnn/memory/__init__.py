"""Memory: the budget (what RAM there is, peak RSS) and the planner (plan_work, the one
entry every face plans through). It imports the engine and common/, never a face."""
