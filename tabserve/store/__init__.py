"""Durable state: atomic file writes, the state directory (``state.ini`` and the endpoint
archives) and the password file.

Importing this package loads nothing: each module is imported on its own, so a worker can
use ``store.archives`` without the rest.
"""
