"""Routed adapter ensembles (ELREA): router files and the prompt features that route."""

from steerserve.adapters.routing.files import (
    Router,
    RouterConfig,
    load_router,
    save_router,
)

__all__ = ["Router", "RouterConfig", "load_router", "save_router"]
