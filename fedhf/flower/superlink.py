"""``python -m fedhf.flower.superlink``: Flower's SuperLink with its Control API on loopback only.

Flower 1.42's SuperLink serves the Fleet API (SuperNodes), the Control API (``flwr run``,
``flwr supernode register``, ``flwr ls``) and the Runtime API (its ServerApp processes) on one
HTTP(S) port, and the open-source Control API authenticates no one (a no-op plugin): whoever
reaches that port can register node keys and submit runs that execute on every SuperNode. Put on
a public address for the SuperNodes, it hands that power to the network.

This launcher runs the same SuperLink (Flower's own app, lifespan and SuperExec, unchanged) on
two listeners of one server:

- the Fleet listener, ``--fleet-host:--fleet-port`` (e.g. 0.0.0.0:9092): only the Fleet API
  (``/v1/fleet/...``) and the health check; every other path is answered 403 with the reason.
  TLS and SuperNode authentication apply as Flower sets them.
- the Control listener, ``--control-host:--control-port`` (default 127.0.0.1:9093): every API.
  Reach it from another machine through an SSH tunnel (``ssh -L 9093:127.0.0.1:9093 HOST``).

``--expose-control-api`` serves every API on the Fleet listener too (with a warning). Other
arguments go to Flower's own ``flower-superlink`` parser (``--ssl-*``, ``--enable-supernode-auth``,
``--database``, ``--disable-runtime-dependency-installation``...); ``--host``/``--port`` are set here.

Private Flower APIs used, for want of a public way to bind the Control API apart in 1.42:
``flwr.superlink.cli.flower_superlink._parse_superlink_lifespan_config`` and ``SuperLinkLifespan``,
``flwr.superlink.main.create_app``. ``tests/contract/test_flower_superlink.py`` fails when they change.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

PUBLIC_PREFIXES = ("/v1/fleet/", "/health")
Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]


class FleetOnlyOn:
    """ASGI wrapper: on the listener at ``public_port`` only the Fleet API and health answer; elsewhere everything."""

    def __init__(self, app: ASGIApp, public_port: int, expose_control: bool = False) -> None:
        self.app = app
        self.public_port = public_port
        self.expose_control = expose_control

    async def __call__(
        self, scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]
    ) -> None:
        if scope["type"] in ("http", "websocket") and not self.expose_control:
            server = scope.get("server") or (None, None)
            path = str(scope.get("path", ""))
            if server[1] == self.public_port and not path.startswith(PUBLIC_PREFIXES):
                await _refuse(scope, send, path)
                return
        await self.app(scope, receive, send)


async def _refuse(scope: Scope, send: Callable[[Any], Awaitable[None]], path: str) -> None:
    body = json.dumps(
        {
            "detail": f"{path} is not served on the Fleet address: the Control and Runtime APIs listen on "
            "the SuperLink's loopback address only (fedhf.flower.superlink). Reach them through an SSH "
            "tunnel."
        }
    ).encode()
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"error: cannot listen on {host}:{port} ({exc.strerror}); choose another address or port."
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m fedhf.flower.superlink", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    parser.add_argument("--fleet-host", default="127.0.0.1", help="address SuperNodes connect to (0.0.0.0: all)")
    parser.add_argument("--fleet-port", type=int, default=9092, help="port of the Fleet listener")
    parser.add_argument(
        "--control-host", default="127.0.0.1", help="address of the Control listener (keep it loopback)"
    )
    parser.add_argument("--control-port", type=int, default=9093, help="port of the Control listener")
    parser.add_argument(
        "--expose-control-api",
        action="store_true",
        help="also serve the Control API on the Fleet listener: anyone who reaches it can submit runs",
    )
    ours, rest = parser.parse_known_args(argv)
    for flag in ("--host", "--port"):
        if any(a == flag or a.startswith(flag + "=") for a in rest):
            parser.error(
                f"{flag} is set by fedhf.flower.superlink; use --fleet-host/--fleet-port "
                f"and --control-host/--control-port"
            )
    for name in ("fleet_port", "control_port"):
        if not 1 <= getattr(ours, name) <= 65535:
            parser.error(f"--{name.replace('_', '-')}: {getattr(ours, name)} is not a port (1-65535)")
    if ours.fleet_port == ours.control_port:
        parser.error("--fleet-port and --control-port must differ")
    return ours, rest


def main(argv: list[str] | None = None) -> None:
    ours, flower_args = parse_args(sys.argv[1:] if argv is None else argv)
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    # Flower parses its own flags; its ServerApp processes reach the Runtime API on the Control listener.
    sys.argv = ["flower-superlink", *flower_args, "--host", ours.control_host, "--port", str(ours.control_port)]
    config = _parse_superlink_lifespan_config()
    if ours.expose_control_api:
        print(
            f"WARNING fedhf.flower.superlink: --expose-control-api: the Control API (submit runs, register node keys) "
            f"is served "
            f"on {ours.fleet_host}:{ours.fleet_port} too, without authentication. Anyone who reaches it can run code "
            "on every SuperNode.",
            file=sys.stderr,
            flush=True,
        )
    app = FleetOnlyOn(create_app(config, SuperLinkLifespan), ours.fleet_port, ours.expose_control_api)
    sockets = [_bind(ours.control_host, ours.control_port), _bind(ours.fleet_host, ours.fleet_port)]
    print(
        f"fedhf.flower.superlink: Fleet API on {ours.fleet_host}:{ours.fleet_port}; Control and Runtime APIs on "
        f"{ours.control_host}:{ours.control_port}" + (" (and on the Fleet address)" if ours.expose_control_api else ""),
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            lifespan="on",
            access_log=True,
            log_config=get_uvicorn_log_config(console_handler.level),
            ssl_keyfile=config.ssl_keyfile,
            ssl_certfile=config.ssl_certfile,
            workers=1,
        )
    )
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
