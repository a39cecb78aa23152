"""How much of a project's accelerator quota one run may hold, importable without kfp (the
``palp pipeline`` flags are built before kfp is imported)."""

# Trainings (train -> sample -> score, one GPU job at a time each) running at once: a new GCP
# project's GPU quota is a handful per region, and a fan-out past it waits or fails to schedule.
DEFAULT_MAX_PARALLEL = 4
