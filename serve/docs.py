"""The API's own description: ``GET /openapi.json`` (OpenAPI 3.1) and ``GET /docs`` (Swagger UI).

Both are behind the bearer token when one is set (like ``/info``); Swagger UI's script and
style sheet (``/docs/assets/...``, public code, no token) come from the ``fastapi-offline``
package, so the page renders where no CDN can be reached. URLs in the page are relative, so
the docs work under any route prefix. Request bodies that the app validates itself (it reads
them with a size limit first) are declared with :func:`body` and their models added to the
document's components by :func:`add_docs_routes`, with the bearer scheme when auth is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

ASSETS = {"swagger-ui-bundle.js": "application/javascript", "swagger-ui.css": "text/css",
          "favicon.png": "image/png"}
PUBLIC = {"security": []}  # openapi_extra of routes that never need the token


def body(model_name: str) -> dict:
    """``openapi_extra`` declaring a JSON request body of the component ``model_name``."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_name}"}}}}}


def _assets_folder() -> Path:
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def _document(app: FastAPI, models: Sequence[type[BaseModel]], auth: bool) -> dict:
    """The OpenAPI document, with ``models`` (and the models they use) in its components."""
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in models:
        own = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(own.pop("$defs", {}))
        components[model.__name__] = own
    if auth:
        schema["components"]["securitySchemes"] = {"bearer": {"type": "http",
                                                              "scheme": "bearer"}}
        schema["security"] = [{"bearer": []}]
    return schema


def add_docs_routes(app: FastAPI, models: Sequence[type[BaseModel]],
                    denied: Callable[[Request], Response | None], auth: bool) -> None:
    """``GET /openapi.json``, ``GET /docs`` and the Swagger UI files."""
    cached: dict = {}

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request):
        if "doc" not in cached:
            cached["doc"] = _document(app, models, auth)
        return denied(request) or JSONResponse(cached["doc"])

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request):
        return denied(request) or get_swagger_ui_html(
            openapi_url="openapi.json", title=f"{app.title}: API",
            swagger_js_url="docs/assets/swagger-ui-bundle.js",
            swagger_css_url="docs/assets/swagger-ui.css",
            swagger_favicon_url="docs/assets/favicon.png")

    folder = _assets_folder()

    @app.get("/docs/assets/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in ASSETS:
            return JSONResponse({"detail": f"no asset {name[:80]!r}"}, 404)
        return FileResponse(folder / name, media_type=ASSETS[name])
