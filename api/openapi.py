"""The OpenAPI document says what inferq really answers: bad input is a 400
with the OpenAI error envelope (not FastAPI's 422 shape)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
_ERRORS = {
    "400": "Invalid request",
    "404": "Unknown model or resource",
    "503": "No worker ready",
    "504": "Timed out waiting for a worker",
}


# OpenAPI links: how one operation's answer feeds the next (an uploaded
# file's id into a batch, a batch's id into its status and cancel), so that
# stateful clients and fuzzers (schemathesis) can chain Files and Batches.
# (source path, method) -> name -> (target path, method, parameters, body).
_LinkSpec = tuple[str, str, dict[str, str], dict[str, Any] | None]
_FILE_ID = {"file_id": "$response.body#/id"}
_BATCH_ID = {"batch_id": "$response.body#/id"}
_LINKS: dict[tuple[str, str], dict[str, _LinkSpec]] = {
    ("/v1/files", "post"): {
        "RetrieveFile": ("/v1/files/{file_id}", "get", _FILE_ID, None),
        "FileContent": ("/v1/files/{file_id}/content", "get", _FILE_ID, None),
        "DeleteFile": ("/v1/files/{file_id}", "delete", _FILE_ID, None),
        "CreateBatch": (
            "/v1/batches",
            "post",
            {},
            {
                "input_file_id": "$response.body#/id",
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
            },
        ),
    },
    ("/v1/batches", "post"): {
        "RetrieveBatch": ("/v1/batches/{batch_id}", "get", _BATCH_ID, None),
        "CancelBatch": ("/v1/batches/{batch_id}/cancel", "post", _BATCH_ID, None),
    },
    ("/v1/batches/{batch_id}", "get"): {
        "OutputFile": (
            "/v1/files/{file_id}/content",
            "get",
            {"file_id": "$response.body#/output_file_id"},
            None,
        ),
        "ErrorFile": (
            "/v1/files/{file_id}/content",
            "get",
            {"file_id": "$response.body#/error_file_id"},
            None,
        ),
        "InputFile": (
            "/v1/files/{file_id}",
            "get",
            {"file_id": "$response.body#/input_file_id"},
            None,
        ),
    },
}


def _add_links(paths: dict[str, Any]) -> None:
    for (path, method), links in _LINKS.items():
        source = paths.get(path, {}).get(method)
        if source is None:
            continue
        declared = source["responses"].setdefault("200", {"description": "OK"})
        for name, (target_path, target_method, parameters, body) in links.items():
            target = paths.get(target_path, {}).get(target_method)
            if target is None or "operationId" not in target:
                continue
            link: dict[str, Any] = {"operationId": target["operationId"]}
            if parameters:
                link["parameters"] = parameters
            if body is not None:
                link["requestBody"] = body
            declared.setdefault("links", {})[name] = link


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorResponse"] = ERROR_SCHEMA
        for methods in schema.get("paths", {}).values():
            for operation in methods.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in _ERRORS.items():
                    responses.setdefault(
                        status,
                        {
                            "description": description,
                            "content": {"application/json": {"schema": _ERROR_REF}},
                        },
                    )
        _add_links(schema.get("paths", {}))
        # FastAPI's validation-error models are never sent.
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
