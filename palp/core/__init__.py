"""Foundations every step shares: storage (local paths and gs://), locks, names, prompts, flags and settings, safe CSV, precision, reproducibility, faults."""
