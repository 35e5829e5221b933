"""run(settings): jobs -> backend -> (storage already written) -> manifest -> Report."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from .backends import get_backend
from .jobs import Template, expand
from .result import Report, Result
from .settings import Settings
from .storage import ManifestWriter, prepare_out

OnResult = Callable[[Result], None]


def template_for(settings: Settings, base_url: str | None = None) -> Template:
    """The validated URL template; with ``base_url`` its scheme and host are replaced."""
    text = settings.url
    if base_url is not None:
        parts = urlsplit(text)
        base = urlsplit(base_url)
        text = urlunsplit((base.scheme, base.netloc, parts.path, parts.query, parts.fragment))
    return Template(text, settings.width, settings.height, settings.keywords)


@contextlib.contextmanager
def _source(settings: Settings) -> Iterator[Template]:
    """The template to fetch from: as configured, or pointed at a built-in server."""
    if not settings.local:
        yield template_for(settings)
        return
    from .server import server_process

    with server_process(settings.server.replace_port(0)) as server:
        yield template_for(settings, server.base_url)


def run(settings: Settings, on_result: OnResult | None = None, keep_results: bool = True) -> Report:
    """Download ``settings.count`` images. Raises ``ConfigError``/``StorageError`` for bad
    settings; per-image failures are in the report, never raised."""
    backend = get_backend(settings.backend)
    template_for(settings)  # a bad template is a ConfigError before OUT is touched
    prepare_out(settings.out)
    report = Report(backend.name)
    with _source(settings) as template, ManifestWriter(settings.out) as manifest:

        def emit(result: Result) -> None:
            manifest.write(result)
            report.add(result)
            if keep_results:
                report.results.append(result)
            if on_result is not None:
                on_result(result)

        usage = _Usage()
        try:
            backend.run(expand(template, settings.count), settings, emit)
        except KeyboardInterrupt:
            report.interrupted = True
        usage.finish(report)
    return report


class _Usage:
    """Wall time, CPU seconds (this process and its reaped children), peak RSS."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.cpu = _cpu()

    def finish(self, report: Report) -> None:
        report.wall_s = time.perf_counter() - self.start
        report.cpu_s = _cpu() - self.cpu
        scale = 1024 if sys.platform != "darwin" else 1  # ru_maxrss is KiB on Linux
        peak = max(
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
        )
        report.peak_rss_mb = peak * scale / 2**20


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
