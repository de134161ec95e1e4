"""A run's first stage: what the source lists and what must change (the plan)."""
