"""Mechanisms: record a step, replay an op, classify what it did, isolate a replay, remedies,
the environment fingerprint and loading the user's script.
"""
