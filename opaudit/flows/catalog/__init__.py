"""The hardware catalog: sweep every op on one device and classify it like an audit does."""

from opaudit.flows.catalog.sweep import *  # noqa: F401,F403  (temporary, until the split)

