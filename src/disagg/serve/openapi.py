"""The OpenAPI documents of the worker and the proxy, made to say what the servers do.

FastAPI documents a 422 for every body it validates; ours answer 400 with an OpenAI error object
(as OpenAI and vLLM do), so the schema says that instead, and clients and fuzzers see the truth.
The proxy reads bodies by hand (it checks them with the workers' own models before any worker
work), so its request schemas are added here from those models.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from disagg.serve.guard import OPEN_PATHS

_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type", "code"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
        "code": {"type": ["integer", "string", "null"]}}}},
}
_ANSWERS = {"400": "the request is invalid", "401": "a key is needed (--api-key) and was missing or wrong",
            "413": "the body is too large", "503": "the server is at a limit or not ready; see Retry-After"}


def truthful_openapi(app: FastAPI, bodies: dict[str, type[BaseModel]] | None = None) -> None:
    """Have `app.openapi()` document our error answers; `bodies`: request models of POST routes that
    read their body by hand, by path."""

    def schema() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
        parts = spec.setdefault("components", {}).setdefault("schemas", {})
        for path, model in (bodies or {}).items():
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            parts.update(body.pop("$defs", {}))
            parts[model.__name__] = body
            spec["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        parts.pop("HTTPValidationError", None)
        parts.pop("ValidationError", None)
        parts["ErrorResponse"] = _ERROR
        error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, item in spec["paths"].items():
            for operation in item.values():
                answers = operation.setdefault("responses", {})
                answers.pop("422", None)
                codes = ["400"] if "requestBody" in operation or operation.get("parameters") else []
                codes += [] if path in OPEN_PATHS else ["401"]
                codes += ["413", "503"] if "requestBody" in operation else []
                for code in codes:
                    answers.setdefault(code, {"description": _ANSWERS[code]} | error)
        app.openapi_schema = spec
        return spec

    app.openapi = schema  # type: ignore[method-assign]
