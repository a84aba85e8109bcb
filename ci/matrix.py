"""Print the GitHub Actions job matrix: one job per env of tox.ini's env_list.

    python3 ci/matrix.py    ->  {"include": [{"env": "lint", "python": "3.13"}, ...]}

A ``pyXY-`` env runs on Python X.Y; every other env on DEFAULT_PYTHON. The
workflow (ci/github-workflow.yml) reads this, so tox.ini stays the one list.
"""

from __future__ import annotations

import configparser
import itertools
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PYTHON = "3.13"


def expand(entry: str) -> list[str]:
    """tox's brace syntax: ``py3{10,11}-core`` -> ``py310-core``, ``py311-core``."""
    parts = re.split(r"\{([^}]*)\}", entry)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def tox_envs(tox_ini: Path = ROOT / "tox.ini") -> list[str]:
    """The envs ``tox`` runs by default (``env_list``), in order."""
    config = configparser.ConfigParser(interpolation=None)
    config.read(tox_ini)
    lines = config["tox"]["env_list"].split()
    return [env for line in lines for env in expand(line)]


def python_of(env: str) -> str:
    match = re.match(r"py3(\d+)-", env)
    return f"3.{match.group(1)}" if match else DEFAULT_PYTHON


def matrix() -> dict[str, list[dict[str, str]]]:
    return {"include": [{"env": env, "python": python_of(env)} for env in tox_envs()]}


if __name__ == "__main__":
    print(json.dumps(matrix()))
