"""The ``download`` command: turns options into Settings and calls the pipeline.

Every error a user can cause is one line on stderr and exit code 2; per-image failures
give exit code 1; a run stopped by a storage fault (disk full, OUT gone...) exits 3; an
interrupted run exits 130.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import click

from .config import load_settings
from .errors import RESUME, ConfigError
from .outcome import ExitCode, for_report, guarded
from .scenarios import CompareSettings, Scenario
from .settings import Declared, Settings, declarations, declared

F = TypeVar("F", bound=Callable[..., Any])


class App(click.Group):
    """A click group whose errors are one line, never a traceback or a usage dump."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        sys.exit(guarded(lambda: super(App, self).main(*args, **kwargs)))


def _size(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        width, height = (int(part) for part in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT like 640x480, got {value!r}") from None
    return width, height


def setting_options(
    command: str, prefix: str = "", items: Iterable[Declared] | None = None
) -> Callable[[F], F]:
    """The click options of ``command``, made from the settings' declarations (or
    ``items``): flag, type, help and ``[default: ...]`` come from ``settings.setting()``.
    A flag left out is None, so the config file and the environment below it still count."""

    def decorate(func: F) -> F:
        for item in reversed(list(declared() if items is None else items)):
            if item.meta.flag is not None and command in item.meta.commands:
                func = _option(item, prefix if item.key.startswith("server.") else "")(func)
        return func

    return decorate


def _option(item: Declared, prefix: str) -> Callable[[F], F]:
    meta = item.meta
    names = [name for name in (meta.short, meta.flag) if name is not None]
    dest = _dest(item.key)
    help_text = f"{prefix}{meta.help}"
    if item.kind is bool:
        return click.option(
            *names, dest, is_flag=True, flag_value=meta.flag_value, default=None, help=help_text
        )
    shown = meta.default_text if meta.default_text is not None else item.default
    if isinstance(shown, float):
        shown = f"{shown:g}"
    if shown not in ("", None):
        help_text += f" [default: {shown}]"
    kind: Any = str
    if meta.parse is None and item.kind in (int, float):
        kind = item.kind
    elif item.kind is Path and meta.parse is None:
        kind = click.Path(path_type=Path)
    return click.option(*names, dest, type=kind, metavar=meta.metavar, default=None, help=help_text)


def _dest(key: str) -> str:
    return key.replace(".", "__")


def setting_overrides(
    command: str, options: dict[str, Any], items: Iterable[Declared] | None = None
) -> dict[str, Any]:
    """The values of ``command``'s setting flags as dotted overrides (None: not given)."""
    overrides: dict[str, Any] = {}
    for item in declared() if items is None else items:
        value = options.get(_dest(item.key))
        if item.meta.flag is None or command not in item.meta.commands:
            continue
        if value is not None and item.meta.parse is not None:
            value = item.meta.parse(value)
        overrides[item.key] = value
    return overrides


def settings_from_options(options: dict[str, Any]) -> Settings:
    """Flags -> dotted overrides -> layered Settings."""
    return load_settings(options.get("config"), overrides=download_overrides(options))


def download_overrides(options: dict[str, Any]) -> dict[str, Any]:
    """The download flags (``--size`` included) as dotted overrides (None: not given)."""
    overrides = setting_overrides("download", options)
    size = _size(options.get("size"))
    if size is not None:
        overrides["width"], overrides["height"] = size
    return overrides


@click.group(
    cls=App,
    invoke_without_command=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@setting_options("download", prefix="With --local: ")
@click.option("--size", metavar="WxH", help="Image size asked of the server. [default: 320x240]")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    help="TOML file layered over the defaults (same keys as config/default.toml).",
)
@click.option("-v", "--verbose", count=True, help="Print every failure as it happens.")
@click.option(
    "--timeline",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="FILE",
    help="Draw every image's wait, cpu and write spans, lane by thread, to FILE (.png or .svg).",
)
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

    \b
    Exit codes: 0 every image ok, 1 some images failed, 2 bad usage or
    configuration, or OUT in use by another download, 3 stopped by a storage
    fault (disk full, read-only, I/O error, OUT removed: fix it, then --resume),
    130 interrupted.
    """
    if ctx.invoked_subcommand is not None:
        ctx.obj = options
        return ExitCode.OK
    settings = settings_from_options(options)
    timeline: Path | None = options["timeline"]
    if timeline is not None:
        from .timeline_chart import check_timeline_file

        check_timeline_file(timeline)
        settings = settings.replace(timeline=True)
    return _download(settings, verbose=options["verbose"], timeline=timeline)


def _download(settings: Settings, verbose: int, timeline: Path | None = None) -> int:
    from .pipeline import run
    from .progress import ProgressReporter

    with ProgressReporter(settings, verbose) as reporter:
        report = run(settings, reporter, keep_results=False)
    click.echo(report.summary())
    if timeline is not None:
        from .timeline_chart import Panel, draw

        panel = Panel(settings.backend, report.spans, bool(settings.thumbnails.python_cpu_ms))
        draw([[panel]], timeline)
        click.echo(f"timeline: {timeline}", err=True)
    if report.note:
        click.echo(report.note, err=True)
    if report.fault:
        click.echo(f"error: {report.fault.then(RESUME)}", err=True)
    return for_report(settings, report)


@main.command()
@setting_options("serve", prefix="Built-in server: ")
@click.pass_context
def serve(ctx: click.Context, /, **options: Any) -> int:
    """Run the built-in loremflickr-compatible image server."""
    from .server import serve as run_server

    parent = ctx.obj or {}
    settings = load_settings(parent.get("config"), overrides=setting_overrides("serve", options))
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
    return ExitCode.OK


@main.command()
@setting_options("service")
@click.pass_context
def service(ctx: click.Context, /, **options: Any) -> int:
    """Run the job service: submit, watch, cancel and fetch downloads over HTTP.

    Jobs are kept in DATA (a SQLite database and one folder per job) and survive restarts:
    running jobs resume where they stopped. See the README, "Run as a service".
    """
    from .service.serve import run_service

    parent = ctx.obj or {}
    overrides = setting_overrides("service", options)
    return run_service(load_settings(parent.get("config"), overrides=overrides))


def _service_options(func: F) -> F:
    """--service and --token, for the commands that talk to a running service."""
    func = click.option("--token", envvar="DOWNLOADER_SERVICE_TOKEN", help="The service's token.")(
        func
    )
    return click.option(
        "--service",
        "service_url",
        default="http://127.0.0.1:8800",
        show_default=True,
        metavar="URL",
        help="The job service to talk to.",
    )(func)


@main.command()
@_service_options
@click.option("--priority", type=int, help="Higher starts first. [default: 0]")
@click.option("--webhook", metavar="URL", help="POST the ended job's JSON to this URL.")
@click.option("--wait", is_flag=True, help="Follow the job (progress bar); exit with its code.")
@click.pass_context
def submit(ctx: click.Context, /, **options: Any) -> int:
    """Submit a download job to a running `download service`; prints the job's id.

    Takes the usual download options (before or after `submit`) but those the service
    chooses itself (--out, --resume, --retry-failed); --urls and --config are read here
    and sent. With --wait, the exit code is the job's: 0 all ok, 1 some failed, 2 refused
    or could not run, 130 cancelled.
    """
    from .service.client import Service, job_body, wait

    given = {k: v for k, v in options.items() if v not in (None, ()) and (k != "verbose" or v)}
    merged = {**(ctx.obj or {}), **given}
    overrides = download_overrides(merged)
    body = job_body(overrides, merged.get("config"), overrides.get("urls"))
    for key in ("priority", "webhook"):
        if options[key] is not None:
            body[key] = options[key]
    service = Service(options["service_url"], options["token"])
    job = service.submit(body)
    click.echo(job["id"])
    if not options["wait"]:
        return ExitCode.OK
    quiet = overrides.get("progress") is False
    return wait(service, job, quiet, int(merged.get("verbose") or 0))


# The usual download options work after `submit` too (the same option objects), but for
# those a service sets itself.
_NOT_FOR_JOBS = {"version", "help", "out", "resume", "retry_failed", "timeline"}
submit.params.extend(param for param in main.params if param.name not in _NOT_FOR_JOBS)


@main.command()
@_service_options
@click.option(
    "--state",
    type=click.Choice(["queued", "running", "paused", "done", "failed", "cancelled"]),
    help="Only the jobs in this state.",
)
def jobs(**options: Any) -> int:
    """List the jobs of a running `download service`, newest first."""
    from .service.client import Service, job_line

    for job in Service(options["service_url"], options["token"]).jobs(options["state"]):
        click.echo(job_line(job))
    return ExitCode.OK


def _job_action(action: str, what: str) -> None:
    @_service_options
    @click.argument("job_id", metavar="ID")
    def command(**options: Any) -> int:
        from .service.client import Service, job_line

        job = Service(options["service_url"], options["token"]).act(options["job_id"], action)
        click.echo(job_line(job))
        return ExitCode.OK

    command.__doc__ = what
    main.command(action)(command)


_job_action("pause", "Pause a queued or running job of a `download service`.")
_job_action("resume", "Queue a paused job again; it goes on where it stopped.")
_job_action("cancel", "Cancel a queued, paused or running job.")
_job_action("retry", "Run an ended job again; nothing kept is fetched again.")


@main.command()
@setting_options("compare", items=declarations(CompareSettings))
@click.pass_context
def compare(ctx: click.Context, /, **options: Any) -> int:
    """Run several backends on the same workload and print a table side by side.

    Each run is a fresh process with a fresh output folder; the built-in server runs in a
    process of its own. Wall time is the median of --repeat runs; CPU and memory count
    every process a run starts.
    """
    from . import compare as comparing
    from . import scoreboard

    given = setting_overrides("compare", options, declarations(CompareSettings))
    wanted = CompareSettings(**{key: value for key, value in given.items() if value is not None})
    if wanted.chart is not None:
        scoreboard.check_chart_dependency()
    if wanted.timeline is not None:
        from .timeline_chart import check_timeline_file

        check_timeline_file(wanted.timeline)
    config = (ctx.obj or {}).get("config")
    request = comparing.Request(wanted, _size(wanted.size), config)

    def progress(scenario: Scenario | None, run: comparing.Run) -> None:
        name = f"{scenario.name}: " if scenario else ""
        click.echo(f"  {name}{run.backend} run {run.repeat + 1}: {run.wall_s:.2f} s", err=True)

    outcomes = comparing.run_plan(comparing.plan(request), progress)
    for outcome in outcomes:
        click.echo(scoreboard.render(outcome))
    if wanted.json is not None:
        scoreboard.write_json(outcomes, wanted.json)
    if wanted.chart is not None:
        scoreboard.write_chart(outcomes, wanted.chart)
    if wanted.timeline is not None:
        scoreboard.write_timeline(outcomes, wanted.timeline)
    return ExitCode.OK if not any(outcome.failed for outcome in outcomes) else ExitCode.FAILED
