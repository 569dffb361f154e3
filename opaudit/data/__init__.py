"""Pure data, the bottom layer: verdicts, the document models (report, catalog, diff, prediction),
observations, and document files.

Nothing here imports torch or any other opaudit layer.
"""
