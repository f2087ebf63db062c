"""Replicas of the server on Ray Serve: each replica is the whole server (its own engine and
batch) as an ASGI ingress, behind Ray Serve's HTTP proxy on the same routes, streaming
included. Ray routes each request to the less loaded of two replicas it picks.

What replicas must agree on (vectors, runtime adapters, temperature heads) lives in the shared
store (server/shared_store.py), which every replica reads before each request.

Ray's own cluster protocol pickles what its members send one another (the deployment, its
arguments, the HTTP messages between proxy and replicas): keep Ray's ports on a trusted network
(Ray's security guidance). Clients only ever reach the HTTP proxy, whose bodies steerserve parses
as JSON, as it does without Ray.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import replace

from ray import serve
from starlette.types import ASGIApp, Receive, Scope, Send

from steerserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)

REPLICA_HEADER = b"x-steerserve-replica"


class ReplicaHeader:
    """Names the replica that answered, so operators (and tests) can see where requests go."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.replica = replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message,
                           "headers": [*message.get("headers", []),
                                       (REPLICA_HEADER, self.replica)]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.ingress()
class SteerserveReplica:
    """One replica: loads the models like `steerserve serve` (off the main thread), then Ray
    runs the app's lifespan, which starts the engine."""

    def __init__(self, settings: ServerSettings) -> None:
        from steerserve.server.cli import build_off_main

        self.ctx = build_off_main(settings)
        self.replica = serve.get_replica_context().replica_id.unique_id

    def __serve_build_asgi_app__(self) -> ASGIApp:
        from steerserve.server.app import create_app

        app = create_app(self.ctx)
        app.add_middleware(ReplicaHeader, replica=self.replica)
        return app

    def check_health(self) -> None:
        """Ray restarts a replica whose engine died (its requests got 503s)."""
        if not self.ctx.engine.is_alive():
            raise RuntimeError(f"engine stopped: {self.ctx.engine.death}")


def application(settings: ServerSettings, replicas: int, cpus: float, gpus: float):
    """The bound deployment: `replicas` copies, each allowed as many requests at once as its
    own engine admits (slots plus queue), so the engine's 429s stay the back-pressure. Torch
    threads default to the CPUs reserved (torch's own default, one per core of the node, would
    oversubscribe a node shared by replicas)."""
    settings = replace(settings, threads=settings.threads or max(1, int(cpus)))
    deployment = serve.deployment(
        SteerserveReplica, name="steerserve", num_replicas=replicas,
        max_ongoing_requests=settings.max_num_seqs + settings.max_queue,
        graceful_shutdown_timeout_s=settings.drain_timeout,
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus})
    return deployment.bind(settings)


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def run(settings: ServerSettings, replicas: int, cpus: float, gpus: float,
        address: str | None) -> None:
    """Start (or join, with `address`) a Ray cluster, deploy, and serve until SIGINT or
    SIGTERM; then the replicas drain (up to --drain-timeout) and a cluster started here stops
    with the process."""
    import ray

    signal.signal(signal.SIGTERM, _interrupt)  # the default would skip the clean-up below
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(application(settings, replicas, cpus, gpus), name="steerserve",
                  route_prefix="/")
        logger.info("serving %d replicas of '%s' on http://%s:%d/v1", replicas,
                    settings.served_model_name or settings.model, settings.host, settings.port)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("steerserve")
        ray.shutdown()
