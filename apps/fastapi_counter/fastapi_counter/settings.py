"""Settings, read once from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

# What a user copying this app changes: the app name (it picks the private
# socket of the embedded state server) and the limits below.
APP_NAME = "fastapi_counter"
MAX_BY = 1000
MAX_BODY = 16 * 1024
MAX_JOB_SECONDS = 30


@dataclass(frozen=True)
class Settings:
    mode: str = "shared"  # "naive": a per-worker global, to show the bug
    state_url: str | None = None  # default: $SHARED_STATE_URL, else local://APP_NAME

    @classmethod
    def from_env(cls) -> Settings:
        return cls(
            mode=os.environ.get("COUNTER_MODE", "shared"),
            state_url=os.environ.get("SHARED_STATE_URL"),
        )
