"""Contract: the Flower 1.42 internals that ``fedhf.flower.superlink`` builds on. These fail first when Flower \
changes them.

fedhf.flower.superlink runs Flower's own SuperLink app on two listeners so that the unauthenticated Control API stays on
loopback; Flower 1.42 has no public way to bind it apart (one --host/--port serves every API).
"""

from __future__ import annotations

import asyncio
import inspect
import sys

import pytest


def test_the_private_entry_points_exist_with_the_shape_fedhf_uses(monkeypatch):
    import importlib

    from flwr.superlink.main import create_app

    flower_superlink = importlib.import_module("flwr.superlink.cli.flower_superlink")

    assert callable(flower_superlink._parse_superlink_lifespan_config)
    assert inspect.isclass(flower_superlink.SuperLinkLifespan)
    assert list(inspect.signature(create_app).parameters)[:2] == ["config", "superlink_lifespan_class"]
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "flower-superlink",
            "--insecure",
            "--host",
            "127.0.0.1",
            "--port",
            "19999",
            "--disable-runtime-dependency-installation",
        ],
    )
    config = flower_superlink._parse_superlink_lifespan_config()
    assert (config.host, config.port) == ("127.0.0.1", 19999)
    for field in ("ssl_keyfile", "ssl_certfile", "isolation", "runtime_dependency_install"):
        assert hasattr(config, field), field


def test_every_fleet_route_and_every_supernode_call_is_under_the_public_prefix():
    from fastapi.routing import iter_route_contexts
    from flwr.superlink.main import create_app
    from flwr.supernode import fleet_http_client

    from fedhf.flower.superlink import PUBLIC_PREFIXES

    app = create_app()
    paths = [c.path for c in iter_route_contexts(app.routes)]
    fleet = [p for p in paths if "fleet" in p]
    assert fleet and all(p.startswith("/v1/fleet/") for p in fleet)
    control = [p for p in paths if p.startswith("/v1/control/")]
    assert control and not any(p.startswith(PUBLIC_PREFIXES) for p in control)  # the Control API is refused there
    runtime = [p for p in paths if p.startswith("/v1/runtime")]
    assert runtime and not any(p.startswith(PUBLIC_PREFIXES) for p in runtime)
    source = inspect.getsource(fleet_http_client)
    called = [line.split('"')[1] for line in source.splitlines() if 'path="' in line]
    assert called and all(p.startswith("/v1/fleet/") for p in called), called


@pytest.mark.parametrize(
    ("port", "path", "status"),
    [
        (9092, "/v1/fleet/pull-messages", 200),
        (9092, "/health", 200),
        (9092, "/v1/control/start-run", 403),
        (9092, "/v1/runtime/x", 403),
        (9092, "/docs", 403),
        (9093, "/v1/control/start-run", 200),
    ],
)
def test_the_fleet_listener_refuses_everything_but_the_fleet_api(port, path, status):
    from fedhf.flower.superlink import FleetOnlyOn

    sent = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(event):
        sent.append(event)

    scope = {"type": "http", "path": path, "server": ("10.0.0.5", port), "headers": []}
    asyncio.run(FleetOnlyOn(app, public_port=9092)(scope, receive, send))
    assert sent[0]["status"] == status
    sent.clear()
    asyncio.run(FleetOnlyOn(app, public_port=9092, expose_control=True)(scope, receive, send))
    assert sent[0]["status"] == 200
