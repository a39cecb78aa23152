"""The method: PALP's guidance and the baselines' as pure functions, and what a training step is fed."""
