"""Backends for other libraries' interfaces (optional extras)."""
