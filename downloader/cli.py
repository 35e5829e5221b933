"""The ``download`` command: turns options into Settings and calls the pipeline.

Every error a user can cause is one line on stderr and exit code 2; per-image failures
give exit code 1; an interrupted run exits 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from .errors import ConfigError, DownloaderError, StorageError
from .settings import BACKENDS, Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_FAILURE_LINES = 10


class App(click.Group):
    """A click group whose errors are one line, never a traceback or a usage dump."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            code = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            code = exc.exit_code
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            code = EXIT_USAGE
        except (ConfigError, StorageError) as exc:
            click.echo(f"error: {exc}", err=True)
            code = EXIT_USAGE
        except DownloaderError as exc:  # a run that could not finish, e.g. every worker failed
            click.echo(f"error: {exc}", err=True)
            code = EXIT_FAILED
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            code = EXIT_INTERRUPTED
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT like 640x480, got {value!r}") from None
    return width, height


def _rate(value: str | None) -> float | None:
    if value is None:
        return None
    text = value.strip().lower().removesuffix("/s")
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"expected requests per second like 10/s, got {value!r}") from None


FAULTS = {
    "fail": "answer 503 with Retry-After",
    "throttle": "answer 429 with Retry-After",
    "reset": "drop the connection mid-body",
    "truncate": "send a Content-Length larger than the body",
    "stall": "send nothing for server.stall_s seconds",
    "slow": "trickle the body over server.slow_ms milliseconds",
    "corrupt": "send image/jpeg with a garbage body (on every attempt)",
}
SERVER_KNOBS = ("latency_ms", "jitter_ms", *(f"{name}_rate" for name in FAULTS))


def server_options(prefix: str) -> Callable[[F], F]:
    """The built-in server's latency and fault knobs, for `serve` and for `--local`."""

    def decorate(func: F) -> F:
        for name in reversed(FAULTS):
            func = click.option(
                f"--{name}-rate",
                type=float,
                metavar="P",
                help=f"{prefix}fraction of images whose first attempt gets: {FAULTS[name]}.",
            )(func)
        func = click.option(
            "--jitter-ms", type=float, help=f"{prefix}random extra latency, 0..MS."
        )(func)
        return click.option(
            "--latency-ms", type=float, help=f"{prefix}simulated latency per image."
        )(func)

    return decorate


def server_overrides(options: dict[str, Any]) -> dict[str, Any]:
    return {f"server.{knob}": options.get(knob) for knob in SERVER_KNOBS}


def settings_from_options(options: dict[str, Any]) -> Settings:
    """Flags -> dotted overrides -> layered Settings."""
    size = _size(options.pop("size", None))
    overrides: dict[str, Any] = {
        "backend": options.get("backend"),
        "count": options.get("count"),
        "url": options.get("url"),
        "out": options.get("out"),
        "keywords": options.get("keywords"),
        "urls": options.get("urls"),
        "match": options.get("match"),
        "gray": True if options.get("gray") else None,
        "unique": True if options.get("unique") else None,
        "name_template": options.get("name_template"),
        "local": True if options.get("local") else None,
        "progress": False if options.get("quiet") else None,
        "http.concurrency": options.get("concurrency"),
        "workers": options.get("workers"),
        "http.timeout": options.get("timeout"),
        "http.retries": options.get("retries"),
        "http.rate": _rate(options.get("rate")),
        "resume": True if options.get("resume") else None,
        "retry_failed": True if options.get("retry_failed") else None,
        "thumbnails.size": options.get("thumbnail_size"),
        "dask.scheduler": options.get("scheduler"),
        "dask.shard_size": options.get("shard_size"),
        **server_overrides(options),
    }
    if size is not None:
        overrides["width"], overrides["height"] = size
    return load_settings(options.get("config"), overrides=overrides)


@click.group(
    cls=App,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.option("-n", "--count", type=int, help="How many images to fetch. [default: 10]")
@click.option(
    "--backend",
    type=str,
    help=f"Concurrency backend: {', '.join(BACKENDS)}. [default: asyncio, or DOWNLOADER_BACKEND]",
)
@click.option(
    "--url",
    metavar="TEMPLATE",
    help="URL template with {i} (0-based index), {width}, {height}, {keywords}. "
    "[default: https://loremflickr.com/{width}/{height}/{keywords}?lock={i}]",
)
@click.option("--out", type=click.Path(path_type=Path), help="Output folder. [default: pic]")
@click.option("--size", metavar="WxH", help="Image size asked of the server. [default: 320x240]")
@click.option("--keywords", help="Comma-separated keywords for {keywords}, e.g. cat,dog.")
@click.option(
    "--match",
    type=click.Choice(["all", "any"]),
    help="loremflickr: photos matching all keywords, or any of them.",
)
@click.option("--gray", is_flag=True, help="loremflickr: grayscale photos (the /g/ prefix).")
@click.option(
    "--urls",
    metavar="FILE",
    help="Fetch the URLs in FILE instead of a template: one per line (# comments), or a "
    "CSV/TSV with a url column; - reads stdin. -n is ignored.",
)
@click.option(
    "--unique",
    is_flag=True,
    help="Keep fetching until N images with distinct content are on disk (bounded).",
)
@click.option(
    "--name-template",
    metavar="T",
    help="File names, e.g. '{index:05d}-{sha8}{ext}'. Fields: index, stem (remote name), "
    "sha8, sha256, ext, width, height. [default: '{index:06d}-{stem}{ext}']",
)
@click.option(
    "--concurrency", type=int, help="Downloads in flight (processes: worker count). [default: 32]"
)
@click.option(
    "--workers",
    type=int,
    help="hybrid backend: event-loop processes sharing the connections. [default: 1 per core]",
)
@click.option(
    "--timeout", type=float, help="Deadline per request in seconds, body included. [default: 30]"
)
@click.option("--retries", type=int, help="Retries on timeouts, resets, 429 and 5xx. [default: 3]")
@click.option(
    "--thumbnail-size",
    type=int,
    metavar="PX",
    help="Thumbnail longest side; 0 = off. [default: 128]",
)
@click.option(
    "--scheduler",
    metavar="URL",
    help="dask backend: scheduler address, tcp://HOST:8786 (default: a LocalCluster). "
    "OUT must be on a file system every worker can write.",
)
@click.option("--shard-size", type=int, help="dask backend: jobs per shard. [default: 100]")
@click.option(
    "--rate",
    metavar="N/s",
    help="At most N requests per second to each host, e.g. 10/s. [default: no limit]",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Keep images the manifest records as ok (file intact, same sha256); fetch the rest.",
)
@click.option(
    "--retry-failed", is_flag=True, help="Re-run only the images the manifest records as failed."
)
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file layered over the defaults (same keys as config/default.toml).",
)
@click.option("--local", is_flag=True, help="Fetch from the built-in server (no internet needed).")
@server_options("With --local: ")
@click.option("-v", "--verbose", count=True, help="Print every failure as it happens.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar; only the summary line.")
@click.version_option(package_name="downloader")
@click.pass_context
def main(ctx: click.Context, /, **options: Any) -> int:
    """Download images in parallel (sync, threads, asyncio, processes, hybrid or dask) with
    thumbnails.

    Images go to OUT, thumbnails to OUT/thumbnails, one JSON line per image to
    OUT/manifest.jsonl. Settings come from config/default.toml < --config FILE <
    DOWNLOADER_* environment variables < flags.

    \b
    Examples:
      download --backend asyncio -n 100 --local
      download --backend threads -n 50 --keywords cat,dog --size 640x480
      download serve --port 8080 --latency-ms 200
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = options
        return EXIT_OK
    settings = settings_from_options(options)
    return _download(settings, verbose=options["verbose"])


def _download(settings: Settings, verbose: int) -> int:
    from .pipeline import run
    from .progress import ProgressReporter

    with ProgressReporter(settings, verbose) as reporter:
        report = run(settings, reporter, keep_results=False)
    click.echo(report.summary())
    if report.note:
        click.echo(report.note, err=True)
    if report.interrupted:
        return EXIT_INTERRUPTED
    if settings.unique and not settings.urls:  # a list has no count to reach
        return EXIT_OK if (report.unique or 0) >= settings.count else EXIT_FAILED
    if settings.unique:
        return EXIT_OK if report.failed == 0 else EXIT_FAILED
    return EXIT_OK if report.failed == 0 else EXIT_FAILED


@main.command()
@click.option("--host", default=None, help="Address to listen on. [default: 127.0.0.1]")
@click.option("--port", type=int, default=None, help="Port; 0 = any free port. [default: 8080]")
@server_options("Built-in server: ")
@click.option("--seed", type=int, default=None, help="Seed for photos and faults. [default: 0]")
@click.option("--pool-size", type=int, default=None, help="Distinct photos per size. [default: 40]")
@click.pass_context
def serve(ctx: click.Context, /, **options: Any) -> int:
    """Run the built-in loremflickr-compatible image server."""
    from .server import serve as run_server

    parent = ctx.obj or {}
    overrides = {
        **server_overrides(options),
        "server.host": options["host"],
        "server.port": options["port"],
        "server.seed": options["seed"],
        "server.pool_size": options["pool_size"],
    }
    settings = load_settings(parent.get("config"), overrides=overrides)
    config = settings.server

    def ready(port: int) -> None:
        click.echo(
            f"serving loremflickr-compatible images on http://{config.host}:{port} "
            f"(latency {config.latency_ms:g} ms, jitter {config.jitter_ms:g} ms); Ctrl-C stops",
            err=True,
        )

    try:
        run_server(config, ready)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return EXIT_OK


@main.command()
@click.option("-n", "--count", type=int, help="Images per run. [default: scenario's, or 200]")
@click.option(
    "--backends",
    help="Comma-separated backends to compare. [default: sync,threads,asyncio,processes,hybrid, "
    "and dask when distributed is installed]",
)
@click.option(
    "--scenario",
    type=click.Choice(["io", "cpu"]),
    help="io: 200 ms latency, 320x240, 100 connections. cpu: no latency, 1920x1080, "
    "8 connections, so thumbnails dominate. Flags given as well win.",
)
@click.option(
    "--local/--no-local", default=True, show_default=True, help="Use the built-in server."
)
@click.option("--latency-ms", type=float, help="Simulated latency per image (built-in server).")
@click.option("--size", metavar="WxH", help="Image size.")
@click.option("--concurrency", type=int, help="Downloads in flight for every backend.")
@click.option("--thumbnail-size", type=int, metavar="PX", help="Thumbnail size; 0 = off.")
@click.option("--repeat", type=click.IntRange(1, 50), default=1, show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), help="Write raw numbers.")
@click.option("--chart", type=click.Path(path_type=Path), help="Write a PNG bar chart.")
@click.option("--keep", type=click.Path(path_type=Path), help="Keep each run's output here.")
@click.pass_context
def compare(ctx: click.Context, /, **options: Any) -> int:
    """Run several backends on the same workload and print a table side by side.

    Each run is a fresh process with a fresh output folder; the built-in server runs in a
    process of its own. Wall time is the median of --repeat runs.
    """
    import json

    from .compare import SCENARIOS, print_table, rows_to_json, verdict, write_chart
    from .compare import compare as run_compare

    parent = ctx.obj or {}
    preset = SCENARIOS.get(options["scenario"] or "", {"count": 200})
    size = _size(options["size"]) or preset.get("size")
    overrides: dict[str, Any] = {
        "count": _first(options["count"], preset["count"]),
        "local": options["local"],
        "server.latency_ms": _first(options["latency_ms"], preset.get("latency_ms")),
        "http.concurrency": _first(options["concurrency"], preset.get("concurrency")),
        "thumbnails.size": options["thumbnail_size"],
        "progress": False,
    }
    if size is not None:
        overrides["width"], overrides["height"] = size
    settings = load_settings(parent.get("config"), overrides=overrides)
    backends = [name.strip() for name in (options["backends"] or _default_backends()).split(",")]
    backends = [name for name in backends if name]
    for name in backends:
        if name not in BACKENDS:
            raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    if options["chart"] is not None:
        _check_chart_dependency()
    for path in (options["json_path"], options["chart"]):
        if path is not None and not path.parent.is_dir():
            raise ConfigError(f"cannot write {path}: {path.parent} is not a folder")
    if options["keep"] is not None:
        from .storage import check_writable

        check_writable(options["keep"])
    rows = run_compare(settings, backends, options["repeat"], options["keep"])
    print_table(rows, settings, options["scenario"])
    click.echo(verdict(rows))
    if options["json_path"] is not None:
        data = rows_to_json(rows, settings, options["scenario"])
        options["json_path"].write_text(json.dumps(data, indent=2) + "\n")
    if options["chart"] is not None:
        latency = f", {settings.server.latency_ms:g} ms latency" if settings.local else ""
        title = (
            f"{options['scenario'] or 'custom'}: {settings.count} x "
            f"{settings.width}x{settings.height}{latency}"
        )
        write_chart(rows, options["chart"], title)
    failed = sum(run.failed for row in rows for run in row.runs)
    return EXIT_OK if failed == 0 else EXIT_FAILED


def _default_backends() -> str:
    import importlib.util

    names = ["sync", "threads", "asyncio", "processes", "hybrid"]
    if importlib.util.find_spec("distributed") is not None:
        names.append("dask")
    return ",".join(names)


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)


def _check_chart_dependency() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError("--chart needs matplotlib: pip install 'downloader[chart]'") from None
