"""Pure data, the bottom layer: verdicts, the report model, observations, and document files.

Nothing here imports torch or any other opaudit layer.
"""
