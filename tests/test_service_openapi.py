"""The published API: /api/v1/openapi.json names every route, and schemathesis, run
against a real service, finds every answer as documented and never a 5xx."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from helpers import child_env, service_process

from downloader.config import load_settings
from downloader.service.app import make_app

TOKEN = "openapi-token"
CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance",
    "response_headers_conformance", "response_schema_conformance",
))  # fmt: skip
# Jobs the generated bodies make fetch nothing off this machine: the template names a
# closed loopback port, which the service's private-address rule refuses anyway.
CONFIG = """\
url = "http://127.0.0.1:9/{i}"
[http]
retries = 0
timeout = 2
[service]
max_count = 5
"""


async def test_the_document_names_every_api_route(tmp_path: Path) -> None:
    settings = load_settings(environ={}, overrides={"service.data": tmp_path / "data"})
    app = make_app(settings)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        document = await (await client.get("/api/v1/openapi.json")).json()
    finally:
        await client.close()
    routes = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/api/v1/")
        and route.method != "HEAD"
    }  # fmt: skip
    documented = {(path, method) for path, ops in document["paths"].items() for method in ops}
    assert routes == documented
    assert document["openapi"].startswith("3.")
    ids = [p for ops in document["paths"].values() for op in ops.values()
           for p in op.get("parameters", []) if p["in"] == "path"]  # fmt: skip
    assert ids and {p["name"] for p in ids} == {"id"}


def test_schemathesis_finds_every_answer_as_documented(tmp_path: Path) -> None:
    tool = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    assert tool is not None, "schemathesis is in the test extra"
    config = tmp_path / "service.toml"
    config.write_text(CONFIG)
    before = ("--config", str(config))
    with service_process(tmp_path / "data", token=TOKEN, before=before) as service:
        run = subprocess.run(
            [tool, "run", f"{service.url}/api/v1/openapi.json",
             "--header", f"Authorization: Bearer {TOKEN}", "--checks", CHECKS,
             "--max-examples", "8", "--seed", "22", "--no-shrink", "--workers", "1",
             "--request-timeout", "20", "--exclude-path-regex", "/events$"],
            capture_output=True, text=True, timeout=300, env=child_env(NO_COLOR="1"),
            cwd=tmp_path,  # its cache goes there, not into the checkout
        )  # fmt: skip
        log = service.log
    summary = run.stdout[run.stdout.find("SUMMARY") :]
    assert run.returncode == 0, run.stdout[-6000:]
    assert re.search(r"(\d+) generated, \1 passed", summary), summary
    # The only tracebacks: aiohttp's own log of a request it could not parse (the
    # NUL-in-a-header probe), which it answers 400.
    for trace in log.read_text().split("Traceback")[1:]:
        assert "BadHttpMessage" in trace.split("\n20")[0], trace
