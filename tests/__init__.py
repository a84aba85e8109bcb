"""The integration suite; its harness (tests/harness.py) is importable as ``tests.harness``."""
