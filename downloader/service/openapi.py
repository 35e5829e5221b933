"""``GET /api/v1/openapi.json``: the OpenAPI 3 document of every ``/api/v1`` route.

Written out here, beside the handlers it describes; ``tests/test_service_openapi.py``
keeps it true by running schemathesis against a real service (every answer as the
document says, never a 5xx) and by checking that it names every route the app has.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from aiohttp import web

from .. import __version__
from ..settings import Declared, declared
from .spec import BLOCK_PRIVATE, MAX_PRIORITY, SERVICE_KEYS, SERVICE_SECTIONS
from .store import STATES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(why: str) -> dict[str, Any]:
    return {"description": why, "content": {JSON: {"schema": _ref("Error")}}}


def _job(status: str, why: str) -> dict[str, Any]:
    return {status: {"description": why, "content": {JSON: {"schema": _ref("Job")}}}}


def _nullable(kind: str, **more: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **more}


_ERRORS = {
    "400": _error("The request is wrong; the message says how."),
    "401": _error("A token is set, and the request has none or a wrong one."),
    "403": _error("No token is set, and the request comes from another site's page."),
    "404": _error("No such job."),
    "409": _error("The job is in a state the request does not apply to."),
    "413": _error("The body is over 1 MiB."),
    "415": _error("The body is not sent as application/json."),
    "429": _error("Too many wrong tokens from this address; wait Retry-After seconds."),
}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _ERRORS[str(code)] for code in (401, 403, *codes)}


_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "The job's id.",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,32}$"},
}
_BODY_ERRORS = (400, 413, 415)

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "One line."}},
    },
    "Delivery": {
        "type": "object",
        "description": "How the job's webhook delivery went.",
        "required": ["state", "attempts", "status", "error", "at"],
        "properties": {
            "state": {"enum": ["pending", "delivered", "failed"]},
            "attempts": {"type": "integer", "minimum": 0},
            "status": _nullable("integer", description="The receiver's last HTTP status."),
            "error": _nullable("string"),
            "at": {"type": "string", "format": "date-time"},
        },
    },
    "Job": {
        "type": "object",
        "required": [
            "id",
            "state",
            "ok",
            "failed",
            "total",
            "created_at",
            "started_at",
            "finished_at",
            "images_per_s",
            "summary",
            "error",
            "priority",
            "webhook",
            "delivery",
            "spec",
        ],
        "properties": {
            "id": {"type": "string"},
            "state": {"enum": list(STATES)},
            "ok": {"type": "integer", "minimum": 0},
            "failed": {"type": "integer", "minimum": 0},
            "total": _nullable("integer"),
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": _nullable("string"),
            "finished_at": _nullable("string"),
            "images_per_s": _nullable("number"),
            "summary": _nullable("string"),
            "error": _nullable("string"),
            "priority": {"type": "integer"},
            "webhook": _nullable("string"),
            "delivery": {"oneOf": [_ref("Delivery"), {"type": "null"}]},
            "spec": {
                "type": "object",
                "description": "The body as sent, less priority and webhook.",
            },
        },
    },
}


_JSON_TYPES = {int: "integer", float: "number", bool: "boolean", str: "string", Path: "string"}


def _setting_schema(item: Declared) -> dict[str, Any]:
    meta = item.meta
    if typing.get_origin(item.kind) is Literal:
        return {"enum": list(typing.get_args(item.kind)), "description": meta.help}
    schema: dict[str, Any] = {"type": _JSON_TYPES.get(item.kind, "string")}
    if item.kind in (int, float):
        if meta.low is not None:
            schema["minimum"] = meta.low
        if meta.high is not None:
            schema["maximum"] = meta.high
        if meta.positive:
            schema["exclusiveMinimum"] = 0
    return {**schema, "description": meta.help}


def job_body() -> dict[str, Any]:
    """The job's body: the settings' keys a job may set (from their declarations, so the
    document names each new one), nested as in the config file, plus urls, priority and
    webhook. Values are checked by the settings' own rules (a 400 names the rule)."""
    body: dict[str, Any] = {
        "urls": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "priority": {
            "type": "integer", "minimum": -MAX_PRIORITY, "maximum": MAX_PRIORITY,
            "description": "Higher starts first; then oldest first.",
        },
        "webhook": {"type": "string", "description": "An http(s) URL the ended job is POSTed to."},
    }  # fmt: skip
    for item in declared():
        if item.key in SERVICE_KEYS or item.key in (BLOCK_PRIVATE, "urls"):
            continue
        if item.key.startswith(SERVICE_SECTIONS):
            continue
        section, _, name = item.key.rpartition(".")
        target = body
        if section:
            nested = body.setdefault(
                section, {"type": "object", "additionalProperties": False, "properties": {}}
            )
            target = nested["properties"]
        target[name] = _setting_schema(item)
    return {"type": "object", "additionalProperties": False, "properties": body}


def _paths() -> dict[str, Any]:
    job_ops = {
        "get": {
            "summary": "A job.",
            "parameters": [_ID],
            "responses": {**_job("200", "The job."), **_errors(404)},
        },
        "patch": {
            "summary": "Change a waiting job's priority.",
            "parameters": [_ID],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {
                        "schema": {
                            "type": "object",
                            "required": ["priority"],
                            "additionalProperties": False,
                            "properties": {"priority": {"type": "integer"}},
                        }
                    }
                },
            },
            "responses": {**_job("200", "The job."), **_errors(*_BODY_ERRORS, 404, 409)},
        },
        "delete": {
            "summary": "Cancel a queued, paused or running job.",
            "parameters": [_ID],
            "responses": {**_job("202", "Cancelling."), **_errors(404, 409)},
        },
    }
    paths: dict[str, Any] = {
        "/api/v1/health": {
            "get": {
                "summary": "Whether the service is up.",
                "security": [],
                "responses": {
                    "200": {
                        "description": "Up.",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["status", "version", "running", "queued"],
                                    "properties": {
                                        "status": {"const": "ok"},
                                        "version": {"type": "string"},
                                        "running": {"type": "integer"},
                                        "queued": {"type": "integer"},
                                    },
                                }
                            }
                        },
                    }
                },
            }
        },
        "/api/v1/login": {
            "post": {
                "summary": "Check a token; sets the page's cookie.",
                "security": [],
                "requestBody": {
                    "required": True,
                    "content": {
                        JSON: {
                            "schema": {
                                "type": "object",
                                "required": ["token"],
                                "properties": {"token": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {
                    "204": {"description": "The right token."},
                    **{c: _ERRORS[c] for c in ("400", "401", "413", "415")},
                    "429": {
                        **_ERRORS["429"],
                        "headers": {
                            "Retry-After": {"required": True, "schema": {"type": "integer"}}
                        },
                    },
                },
            }
        },
        "/api/v1/jobs": {
            "get": {
                "summary": "Jobs, newest first.",
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
                    },
                    {"name": "state", "in": "query", "schema": {"enum": list(STATES)}},
                ],
                "responses": {
                    "200": {
                        "description": "The jobs.",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["jobs"],
                                    "properties": {"jobs": {"type": "array", "items": _ref("Job")}},
                                }
                            }
                        },
                    },
                    **_errors(400),
                },
            },
            "post": {
                "summary": "Submit a job.",
                "requestBody": {"required": True, "content": {JSON: {"schema": _ref("JobBody")}}},
                "responses": {**_job("201", "Queued."), **_errors(*_BODY_ERRORS)},
            },
        },
        "/api/v1/jobs/{id}": job_ops,
        "/api/v1/jobs/{id}/manifest": {
            "get": {
                "summary": "The job's manifest so far.",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "One JSON line per image.",
                        "content": {"application/x-ndjson": {"schema": {"type": "string"}}},
                    },
                    **_errors(404),
                },
            }
        },
        "/api/v1/jobs/{id}/timeline": {
            "get": {
                "summary": "The spans (wait, cpu, write) of the job's latest run, after the "
                "cursor ?after=NEXT (the last answer's next), at most ?limit=N at a time.",
                "parameters": [
                    _ID,
                    {
                        "name": "after",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1},
                    },
                ],
                "responses": {
                    "200": {
                        "description": "The spans, where to ask from next, the job's state.",
                        "content": {
                            JSON: {
                                "schema": {
                                    "type": "object",
                                    "required": ["spans", "next", "state"],
                                    "properties": {
                                        "spans": {"type": "array", "items": {"type": "object"}},
                                        "next": {"type": "integer"},
                                        "state": {"type": "string", "enum": list(STATES)},
                                    },
                                }
                            }
                        },
                    },
                    **_errors(400, 404),
                },
            }
        },
        "/api/v1/jobs/{id}/events": {
            "get": {
                "summary": "The job's results as they come "
                "(Server-Sent Events: result, progress, end; Last-Event-ID resumes).",
                "parameters": [_ID],
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(404),
                },
            }
        },
        "/api/v1/events": {
            "get": {
                "summary": "Every job's changes (Server-Sent Events: job).",
                "responses": {
                    "200": {
                        "description": "The stream.",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    **_errors(),
                },
            }
        },
        "/api/v1/openapi.json": {
            "get": {
                "summary": "This document.",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    },
                    **_errors(),
                },
            }
        },
    }
    for action, why, states in (
        (
            "pause",
            "Pause a queued or running job (a running one stops as a cancel does).",
            "queued or running",
        ),
        ("resume", "Queue a paused job again; it goes on as a retry does.", "paused"),
        ("retry", "Run an ended job again; nothing kept is fetched again.", "ended"),
    ):
        paths[f"/api/v1/jobs/{{id}}/{action}"] = {
            "post": {
                "summary": why,
                "description": f"Only a {states} job; else 409.",
                "parameters": [_ID],
                "responses": {**_job("202", "Done."), **_errors(404, 409)},
            }
        }
    return paths


def document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "downloader service",
            "version": __version__,
            "description": "Jobs of parallel image downloads (docs/service.md).",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**_SCHEMAS, "JobBody": job_body()},
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "service.token; the page uses the login's cookie.",
                }
            },
        },
        "security": [{"token": []}],
    }


routes = web.RouteTableDef()


@routes.get("/api/v1/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
