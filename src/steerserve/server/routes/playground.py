"""The steering playground: a static page at `/` (server/static/, plain HTML/JS/CSS, no build
step) and the little it needs to know about this server that /v1 does not say.

The page itself needs no key (it holds nothing secret); every API call it makes sends the key
typed into it, and /playground/config is behind that key like the /v1 routes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from steerserve.server.auth import check_api_key
from steerserve.server.context import ServingContext

STATIC = Path(__file__).resolve().parent.parent / "static"

# Nothing from another origin may load or be called: the page works offline, and a page that
# cannot load scripts from elsewhere cannot be made to leak the key it holds.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def config(ctx: ServingContext) -> dict:
    """What the page's controls need: layer counts (slider bounds), head counts, which admin
    routes are on (so it offers load/unload and extraction only where they can work), and the
    temperature heads a `learned` adaptive temperature may name."""
    models = {name: {"num_layers": info.shape.num_layers, "num_heads": info.shape.num_heads}
              for name, info in ctx.engine.models.items()}
    return {"default_model": ctx.model_name, "models": models,
            "runtime_lora": ctx.settings.allow_runtime_lora,
            "runtime_vectors": ctx.settings.allow_runtime_vectors,
            "admin_key": ctx.settings.admin_key is not None,
            "temperature_heads": sorted(ctx.temperature_heads)}


def install(app: FastAPI, ctx: ServingContext) -> None:
    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers=PAGE_HEADERS)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:  # browsers ask for it whatever the page says
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/playground/config", include_in_schema=False)
    async def playground_config(request: Request) -> JSONResponse:
        check_api_key(request, ctx.settings.api_key)
        return JSONResponse(config(ctx))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
