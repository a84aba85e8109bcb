"""The core checks through a real nginx in front of the app server.

Run by ``tox -e nginx`` (Debian's nginx, on loopback). The client connects
from 127.0.0.2, so that the address the app reports can only be right if it
came from nginx's X-Forwarded-For.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared_core.testing import free_port, spawn, wait_for
from tests.harness import Pairing, get, hammer, post

pytestmark = pytest.mark.nginx

CLIENT_ADDRESS = "127.0.0.2"
CONFIG = """
daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # No upstream keepalive here, so that requests spread over the workers.
    upstream app {{ server 127.0.0.1:{upstream}; }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 16k;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
        }}
    }}
}}
"""


@pytest.fixture
def behind_nginx(launch: Any, pairing: Pairing) -> Iterator[str]:
    """The app (4 workers) behind nginx; yields nginx's URL."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        pytest.fail("nginx is not installed (Debian: apt-get install nginx)")
    # uvicorn (and gunicorn's uvicorn worker) trust 127.0.0.1 by themselves;
    # Flask, hypercorn and granian are told how many proxies to trust.
    trusts_none = pairing.server in ("hypercorn", "granian")
    hops = "1" if pairing.framework == "flask" or trusts_none else "0"
    d = launch(env={"TRUSTED_PROXY_HOPS": hops})
    workdir = Path(tempfile.mkdtemp(prefix="ngx-"))
    port = free_port()
    upstream = d.url.rsplit(":", 1)[1]
    (workdir / "nginx.conf").write_text(CONFIG.format(dir=workdir, upstream=upstream, port=port))
    proc = spawn(  # ended with the test run, however it ends
        [binary, "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        try:
            return get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(answers, 20, "nginx")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
        shutil.rmtree(workdir, ignore_errors=True)


def client(url: str) -> httpx.Client:
    transport = httpx.HTTPTransport(local_address=CLIENT_ADDRESS)
    return httpx.Client(base_url=url, transport=transport, timeout=30)


def test_the_app_sees_the_real_client_address(behind_nginx: str) -> None:
    with client(behind_nginx) as c:
        seen = c.get("/whoami").json()
    assert seen["client"] == CLIENT_ADDRESS, seen
    assert seen["scheme"] == "http"


def test_core_checks_through_nginx(behind_nginx: str) -> None:
    url = behind_nginx
    post(f"{url}/reset")
    outcome = hammer(url, "/increment", 1000, 100)
    assert not outcome.errors, outcome.errors[:3]
    assert sorted(body["count"] for body in outcome.ok) == list(range(1, 1001))
    assert len(outcome.pids) >= 2
    reports = [get(f"{url}/report").json() for _ in range(40)]
    assert {r["count"] for r in reports} == {1000}
    assert post(f"{url}/reset").json()["count"] == 0
    assert {get(f"{url}/report").json()["count"] for _ in range(20)} == {0}
    # A session set through nginx is valid whichever worker nginx picks.
    with httpx.Client(base_url=url, timeout=30) as c:
        visits = [c.get("/session").json() for _ in range(40)]
        while len({v["pid"] for v in visits}) < 2 and len(visits) < 200:
            visits.append(c.get("/session").json())  # one worker may win many in a row
    assert [v["visits"] for v in visits] == list(range(1, len(visits) + 1))
    assert len({v["pid"] for v in visits}) >= 2


def test_an_oversized_body_is_refused_at_the_proxy(behind_nginx: str) -> None:
    r = post(f"{behind_nginx}/increment", content=b"x" * 100_000)
    assert r.status_code == 413
