"""Orchestration: the audit pipeline, the whole-step run-check, the hardware catalog, diff and predict."""
