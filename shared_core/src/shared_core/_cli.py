"""``shared-core`` / ``python -m shared_core``: serve, run, info."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from ._config import ENV_URL, Config, base_dir, ensure_private_dir, resolve
from ._errors import StateError


def _serve(args: argparse.Namespace) -> int:
    from .engines.embedded.server import serve

    config = resolve(args.url, args.app)
    if args.allow_remote:
        config = dataclasses.replace(config, allow_remote=True)
    ready = None
    if args.detach:
        if os.fork():
            os._exit(0)

        def ready() -> None:
            # Tell the starter we listen, then let go of its pipe.
            os.write(1, f"READY {os.getpid()}\n".encode())
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.close(devnull)

    linger = args.linger if args.linger is not None and args.linger >= 0 else None
    return serve(
        config,
        linger=linger,
        watch_pid=args.watch_pid,
        start_locked=args.start_locked,
        ready=ready,
    )


def _serving_url(config: Config) -> str:
    if config.scheme == "local":
        return f"unix://{config.address}"
    return config.url


def _run(args: argparse.Namespace) -> int:
    """Serve in a child, run the command with SHARED_STATE_URL set, stop both."""
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("shared-core run: give a command after --", file=sys.stderr)
        return 2
    config = resolve(args.url, args.app)
    if config.scheme == "local":
        ensure_private_dir(base_dir())
    url = _serving_url(config)
    server = subprocess.Popen(
        [sys.executable, "-m", "shared_core", "serve", "--url", url, "--app", args.app]
    )
    env = dict(os.environ, **{ENV_URL: url})
    from .engines.embedded.lifecycle import connect

    try:
        connect(resolve(url)).close()  # wait until it answers
        app = subprocess.Popen(command, env=env)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, lambda s, f: app.send_signal(s))
        return app.wait()
    finally:
        server.terminate()
        server.wait()


def _info(args: argparse.Namespace) -> int:
    from ._state import SharedState

    with SharedState(args.url, app=args.app) as state:
        print(json.dumps(state.info(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``shared-core`` command."""
    parser = argparse.ArgumentParser(prog="shared-core", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="run the state server in the foreground")
    serve.add_argument("--url", help=f"where to listen (default: ${ENV_URL}, else local://APP)")
    serve.add_argument("--app", default=None, help="app name of the default local URL")
    serve.add_argument(
        "--linger", type=float, default=None,
        help="exit after this many seconds without clients (default: never)",
    )  # fmt: skip
    serve.add_argument(
        "--allow-remote", action="store_true",
        help="allow a TCP bind beyond loopback (the protocol unpickles requests)",
    )  # fmt: skip
    serve.add_argument("--watch-pid", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--detach", action="store_true", help=argparse.SUPPRESS)
    serve.add_argument("--start-locked", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(func=_serve)

    run = sub.add_parser("run", help="serve while running an app server command")
    run.add_argument("--url", default=None)
    run.add_argument("--app", default="default")
    run.add_argument("command", nargs=argparse.REMAINDER)
    run.set_defaults(func=_run)

    info = sub.add_parser("info", help="print what a running server reports")
    info.add_argument("--url", default=None)
    info.add_argument("--app", default=None)
    info.set_defaults(func=_info)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(message)s")
    try:
        return int(args.func(args))
    except StateError as exc:
        print(f"shared-core: {exc}", file=sys.stderr)
        return 1
