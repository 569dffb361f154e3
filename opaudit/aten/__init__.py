"""Torch mechanics: op kinds, tensor snapshots and bit comparison, signature text.

Imports torch and :mod:`opaudit.data` only.
"""
