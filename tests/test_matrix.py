"""The list of pairings is written once, in tests/harness.py: what repeats it must agree.

tox.ini cannot import it, and docs/testing.md shows it as a table, so both
are checked here; the CI workflow reads tox.ini through ci/matrix.py, and the
benchmarks import the list.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.harness import PAIRINGS, ROOT, Pairing, pairing_table


def _jobs() -> dict[str, tuple[int, ...]]:
    """The CI workflow's jobs, as ci/matrix.py prints them: env -> Python version."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "ci" / "matrix.py")], capture_output=True, text=True, check=True
    ).stdout
    return {
        job["env"]: tuple(map(int, job["python"].split("."))) for job in json.loads(out)["include"]
    }


def test_tox_env_list_has_every_pairing_in_order() -> None:
    pairing_envs = [env for env in _jobs() if env.split("-")[0] in ("flask", "quart", "fastapi")]
    assert pairing_envs == PAIRINGS, "tox.ini's env_list and tests/harness.py PAIRINGS differ"


def test_the_workflow_runs_every_env_on_its_python() -> None:
    jobs = _jobs()
    assert {env: jobs.get(env) for env in ("py310-core", "py314-core")} == {
        "py310-core": (3, 10),
        "py314-core": (3, 14),
    }
    # Quart 0.21 and later need Python 3.11.
    assert all(jobs[name] >= (3, 11) for name in PAIRINGS if name.startswith("quart"))
    assert {"lint", "chaos", "nginx", "browser", "docs"} <= set(jobs)


def test_docs_table_is_the_harness_table() -> None:
    doc = (ROOT / "docs" / "testing.md").read_text()
    table = re.search(r"<!-- pairings -->\n(.*?)<!-- /pairings -->", doc, re.S)
    assert table, "docs/testing.md lost its <!-- pairings --> markers"
    assert table.group(1) == pairing_table(), (
        "docs/testing.md's table is out of date; print the new one with "
        "`python -m tests.harness`:\n" + pairing_table()
    )


def test_ci_chaos_pairings_are_pairings() -> None:
    script = (ROOT / "ci" / "test").read_text()
    default = re.search(r"CHAOS_PAIRINGS:-([\w,-]+)\}", script)
    assert default, "ci/test no longer sets a default CHAOS_PAIRINGS"
    for name in default.group(1).split(","):
        assert name in PAIRINGS, name
        Pairing.parse(name)
