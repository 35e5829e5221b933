"""Settings: frozen dataclasses, layered defaults <- config file <- DOWNLOADER_* env <- flags.

Each setting is declared once, as a dataclass field made by ``setting()``: its type (the
annotation; enumerations are ``Literal``), its default, its bounds, its help text and its
command-line flag. Everything else is derived from that declaration: the dotted key
(``count``, ``http.timeout``) used the same way in the TOML file (``[http] timeout = 30``)
and in the environment (``DOWNLOADER_HTTP_TIMEOUT=30``), the validation (one-line
``ConfigError``s, never a silent default), and the click options with their
``[default: ...]`` help (``cli_options``) and its row in docs/configuration.md
(``python -m downloader.configdoc``). Adding a setting is one ``setting()`` line plus its
line in ``default.toml``, then a run of that generator.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .choices import (
    BACKEND_NAMES,
    BackendName,
    EncodeFormat,
    EventLoop,
    InputFormat,
    Match,
    OutputFormat,
    ResizeMode,
    ThumbnailExecutor,
    Verify,
)
from .declare import Checked, Setting, bare, check, hints, meta_of, setting
from .errors import ConfigError

DEFAULT_URL = "https://loremflickr.com/{width}/{height}/{keywords}?lock={i}"

# The built-in server's fault kinds, in the order their rates are stacked: each is a
# ``server.<kind>_rate`` setting, a ``--<kind>-rate`` flag and a behaviour of the server.
FAULTS: dict[str, str] = {
    "fail": "answer 503 with Retry-After",
    "throttle": "answer 429 with Retry-After",
    "reset": "drop the connection mid-body",
    "truncate": "send a Content-Length larger than the body",
    "stall": "send nothing for server.stall_s seconds",
    "slow": "trickle the body over server.slow_ms milliseconds",
    "corrupt": "send image/jpeg with a garbage body (on every attempt)",
}


def _columns(text: str) -> str:
    return ",".join(c.strip() for c in text.split(",") if c.strip())


def _path_or_url(text: str) -> Path | str:
    """``--out``: a folder, or a URL kept as text (``Path`` would fold ``s3://b`` into
    ``s3:/b``)."""
    from .stores import is_url

    return text.strip() if is_url(text) else Path(text)


def parse_rate(text: str) -> float:
    """``"10/s"`` or ``"10"`` -> 10.0 requests per second."""
    try:
        return float(text.strip().lower().removesuffix("/s"))
    except ValueError:
        raise ConfigError(f"expected requests per second like 10/s, got {text!r}") from None


@dataclass(frozen=True)
class HttpSettings(Checked):
    section = "http."

    concurrency: int = setting(
        32, "Downloads in flight (processes: worker count).", flag="--concurrency", low=1
    )
    per_host: int = setting(
        0, "Connections per host for asyncio and hybrid (0 = same as concurrency).", low=0
    )
    timeout: float = setting(
        30.0,
        "Deadline per request in seconds, redirects and body included.",
        flag="--timeout",
        positive=True,
        high=86400,
    )
    retries: int = setting(
        3, "Retries on timeouts, resets, 429 and 5xx.", flag="--retries", low=0, high=100
    )
    backoff: float = setting(0.5, "First backoff wait in seconds (full jitter).", low=0, high=3600)
    max_backoff: float = setting(30.0, "Longest backoff wait in seconds.", low=0, high=3600)
    max_bytes: int = setting(20 * 1024 * 1024, "Largest body accepted, in bytes.", low=1)
    max_redirects: int = setting(10, "Redirects followed before giving up.", low=0)
    rate: float = setting(
        0.0,
        "At most N requests per second to each host, e.g. 10/s.",
        flag="--rate",
        metavar="N/s",
        parse=parse_rate,
        default_text="no limit",
    )
    user_agent: str = setting("downloader/0.1 (+https://github.com/)", "User-Agent header.")
    block_private: bool = setting(
        False,
        "Connect only to public addresses: refuse loopback, private, link-local, ...; "
        "never through a proxy (HTTP_PROXY etc. are ignored: the check must see the "
        "address connected to).",
    )

    disallowed_header_directives: str = setting(
        "noai,noimageai,noindex,noimageindex",
        "X-Robots-Tag directives that keep an image out ('' = none).",
        flag="--disallowed-header-directives", metavar="D,D", parse=_columns,
    )  # fmt: skip
    user_agent_token: str = setting(
        "", "Our name in the User-Agent, and the agent whose scoped X-Robots-Tag directives "
        "apply.", flag="--user-agent-token", metavar="NAME", default_text="none",
    )  # fmt: skip

    def check(self) -> None:
        check(
            all(32 <= ord(c) < 127 and c not in "();" for c in self.user_agent_token),
            "http.user_agent_token must be printable ASCII without ( ) ;",
        )
        check(
            self.rate == 0 or 0.001 <= self.rate <= 1e6,
            "http.rate must be 0 (no limit) or 0.001 to 1000000 requests per second",
        )


@dataclass(frozen=True)
class ThumbnailSettings(Checked):
    section = "thumbnails."

    size: int = setting(
        128,
        "Thumbnail longest side; 0 = off (the default with webdataset and parquet output).",
        flag="--thumbnail-size",
        metavar="PX",
        low=0,
    )
    executor: ThumbnailExecutor = setting(
        "auto",
        "Where asyncio and threads check images and make thumbnails: thread, process, "
        "inline, or auto (inline when no pixels are decoded and no python_cpu_ms runs: "
        "--thumbnail-size 0 --verify header; else thread).",
    )
    quality: int = setting(85, "JPEG quality of thumbnails.", low=1, high=95)
    python_cpu_ms: int = setting(
        0,
        "Milliseconds of pure-Python CPU work per image, holding the GIL (a stand-in for "
        "user code; compare --scenario gil).",
        low=0,
        high=60000,
    )


_BOTH = ("download", "serve")  # server knobs: `serve`, and `download --local`


def _fault_rate(kind: str) -> Any:
    return setting(
        0.0,
        f"fraction of images whose first attempt gets: {FAULTS[kind]}.",
        flag=f"--{kind}-rate",
        metavar="P",
        low=0,
        high=1,
        commands=_BOTH,
    )


@dataclass(frozen=True)
class ServerSettings(Checked):
    """Knobs of the built-in loremflickr-compatible server (``serve`` and ``--local``)."""

    section = "server."

    host: str = setting("127.0.0.1", "Address to listen on.", flag="--host", commands=("serve",))
    port: int = setting(
        8080, "Port; 0 = any free port.", flag="--port", low=0, high=65535, commands=("serve",)
    )
    latency_ms: float = setting(
        0.0, "simulated latency per image.", flag="--latency-ms", low=0, commands=_BOTH
    )
    jitter_ms: float = setting(
        0.0, "random extra latency, 0..MS.", flag="--jitter-ms", low=0, commands=_BOTH
    )
    seed: int = setting(0, "Seed for photos and faults.", flag="--seed", commands=("serve",))
    pool_size: int = setting(
        40, "Distinct photos per size.", flag="--pool-size", low=1, commands=("serve",)
    )
    # Fault injection: the share of entry URLs (first request only, except corrupt) that fail.
    fail_rate: float = _fault_rate("fail")
    throttle_rate: float = _fault_rate("throttle")
    reset_rate: float = _fault_rate("reset")
    truncate_rate: float = _fault_rate("truncate")
    stall_rate: float = _fault_rate("stall")
    slow_rate: float = _fault_rate("slow")
    corrupt_rate: float = _fault_rate("corrupt")
    retry_after: int = setting(1, "Seconds sent in Retry-After by fail and throttle.", low=0)
    stall_s: float = setting(3600.0, "How long a stall lasts, in seconds.", low=0)
    slow_ms: float = setting(1000.0, "How long a slow body takes, in milliseconds.", low=0)

    def check(self) -> None:
        check(
            sum(rate for _, rate in self.fault_rates()) <= 1 + 1e-9,
            f"server fault rates ({' + '.join(f'{k}_rate' for k in FAULTS)}) "
            "must add up to at most 1",
        )

    def fault_rates(self) -> tuple[tuple[str, float], ...]:
        """Each fault kind with its rate, in the order of ``FAULTS``."""
        return tuple((kind, getattr(self, f"{kind}_rate")) for kind in FAULTS)

    def replace_port(self, port: int) -> ServerSettings:
        return dataclasses.replace(self, port=port)


@dataclass(frozen=True)
class DaskSettings(Checked):
    section = "dask."

    scheduler: str = setting(
        "",
        "dask backend: scheduler address, tcp://HOST:8786. "
        "OUT must be on a file system every worker can write, or a URL (s3://...).",
        flag="--scheduler",
        metavar="URL",
        default_text="a LocalCluster",
    )
    shard_size: int = setting(100, "dask backend: jobs per shard.", flag="--shard-size", low=1)
    workers: int = setting(0, "LocalCluster worker processes (0 = one per core).", low=0)

    def check(self) -> None:
        check(
            not self.scheduler or "://" in self.scheduler,
            "dask.scheduler must look like tcp://HOST:8786",
        )


@dataclass(frozen=True)
class DatasetSettings(Checked):
    """What dataset builders ask of img2dataset, under its option names and defaults:
    input columns, shard formats, resize and encode modes, filters, the opt-out."""

    section = "dataset."

    input_format: InputFormat = setting(
        "auto", "--urls format: txt, csv, tsv, json, jsonl, parquet; auto = by extension "
        "(.gz read through gzip).", flag="--input-format",
    )  # fmt: skip
    url_col: str = setting("url", "Column of the URLs in --urls.", flag="--url-col")
    caption_col: str = setting(
        "", "Column of the captions in --urls (kept with each image).", flag="--caption-col",
        default_text="none",
    )  # fmt: skip
    save_additional_columns: str = setting(
        "", "Comma-separated columns of --urls kept with each image (their types kept).",
        flag="--save-additional-columns", metavar="A,B", parse=_columns, default_text="none",
    )  # fmt: skip
    output_format: OutputFormat = setting(
        "files", "files (one file an image), webdataset (.tar shards) or parquet shards.",
        flag="--output-format",
    )  # fmt: skip
    samples_per_shard: int = setting(
        10000, "Input rows per shard: shard k holds rows k*S ... (k+1)*S-1.",
        flag="--samples-per-shard", metavar="S", low=1, high=10**7,
    )  # fmt: skip
    resize_mode: ResizeMode = setting(
        "no", "no, keep_ratio (smaller side = --image-size), keep_ratio_largest (larger side), "
        "center_crop (smaller side, then a centred square) or border (larger side, padded "
        "white to a square).", flag="--resize-mode",
    )  # fmt: skip
    image_size: int = setting(
        256, "Side in pixels for --resize-mode.", flag="--image-size", metavar="PX", low=1,
        high=65535,
    )  # fmt: skip
    resize_only_if_bigger: bool = setting(
        False, "Resize only images that would shrink.", flag="--resize-only-if-bigger"
    )
    encode_format: EncodeFormat = setting(
        "jpg", "Format of resized images and of shard samples (the downloaded bytes are kept "
        "when already in it and not resized).", flag="--encode-format",
    )  # fmt: skip
    encode_quality: int = setting(
        95, "JPEG/WebP quality of encoded images.", flag="--encode-quality", low=1, high=100
    )
    min_image_size: int = setting(
        0, "Refuse images whose smaller side is below this (failed_to_resize).",
        flag="--min-image-size", metavar="PX", low=0,
    )  # fmt: skip
    max_image_area: float = setting(
        math.inf, "Refuse images of more pixels than this.", flag="--max-image-area",
        metavar="PX", positive=True, default_text="no limit",
    )  # fmt: skip
    max_aspect_ratio: float = setting(
        math.inf, "Refuse images whose longer side is more than this times the shorter.",
        flag="--max-aspect-ratio", metavar="R", low=1, default_text="no limit",
    )  # fmt: skip
    @property
    def shards(self) -> bool:
        return self.output_format != "files"

    def check(self) -> None:
        check(bool(self.url_col.strip()), "dataset.url_col must name a column")


_SERVICE = ("service",)


@dataclass(frozen=True)
class ServiceSettings(Checked):
    """``download service``: where it listens, where it keeps jobs, the caps on one job."""

    section = "service."

    host: str = setting(
        "127.0.0.1",
        "Address to listen on; any but loopback needs a token.",
        flag="--host",
        commands=_SERVICE,
    )
    port: int = setting(
        8800, "Port; 0 = any free port.", flag="--port", low=0, high=65535, commands=_SERVICE
    )
    data: Path = setting(
        Path("service-data"),
        "Folder of the job database and of each job's files.",
        flag="--data",
        commands=_SERVICE,
    )
    max_jobs: int = setting(
        2, "Jobs running at once; the rest wait in order.", flag="--max-jobs", low=1,
        high=256, commands=_SERVICE,
    )  # fmt: skip
    token: str = setting(
        "",
        "Bearer token for /api and /files (or DOWNLOADER_SERVICE_TOKEN).",
        flag="--token",
        commands=_SERVICE,
    )
    allow_private: bool = setting(
        False,
        "Let jobs fetch loopback, private and link-local addresses (trusted setups only).",
        flag="--allow-private",
        commands=_SERVICE,
    )
    max_count: int = setting(100_000, "Most images one job may ask for.", low=1)
    max_concurrency: int = setting(
        256, "Highest http.concurrency, http.per_host and workers of one job.", low=1
    )
    webhook_secret: str = setting(
        "",
        "Key of the webhooks' X-Downloader-Signature (HMAC-SHA256 of the body); empty = unsigned.",
        flag="--webhook-secret",
        commands=_SERVICE,
    )
    webhook_retry_s: float = setting(
        600.0, "How long a webhook's delivery is retried after its job ends, in seconds.",
        positive=True, high=7 * 86400,
    )  # fmt: skip
    out_urls: str = setting(
        "",
        "URL prefixes under which a job may name its own out (comma-separated, e.g. "
        "s3://bucket/jobs); none: the service chooses where every job's files go.",
        flag="--allow-out-urls",
        metavar="URL,URL",
        parse=_columns,
        commands=_SERVICE,
        default_text="none",
    )

    def check(self) -> None:
        check(
            all(32 < ord(c) < 127 for c in self.token),
            "service.token must be printable ASCII without spaces",
        )


@dataclass(frozen=True)
class Settings(Checked):
    count: int = setting(10, "How many images to fetch.", flag="--count", short="-n", low=1)
    backend: BackendName = setting(
        "asyncio", f"Concurrency backend: {', '.join(BACKEND_NAMES)}.", flag="--backend"
    )
    url: str = setting(
        DEFAULT_URL,
        "URL template with {i} (0-based index), {width}, {height}, {keywords}.",
        flag="--url",
        metavar="TEMPLATE",
    )
    out: Path = setting(
        Path("pic"),
        "Output folder, or a URL for webdataset/parquet shards (s3://BUCKET/PREFIX, any fsspec "
        "URL; needs the s3 extra).",
        flag="--out",
        metavar="PATH|URL",
        parse=_path_or_url,
    )
    state: str = setting(
        "",
        "With an --out URL: the local folder of the run's manifest, lock and temp files.",
        flag="--state",
        metavar="DIR",
        default_text=".downloader-state/<the URL as a name>",
    )
    store: str = setting(
        "",
        "The URL the shards go to, set by an --out URL (out is then the local state folder).",
        default_text="none",
    )
    width: int = setting(320, "Image width asked of the server (--size WxH).", low=1)
    height: int = setting(240, "Image height asked of the server (--size WxH).", low=1)
    keywords: str = setting(
        "", "Comma-separated keywords for {keywords}, e.g. cat,dog.", flag="--keywords"
    )
    match: Match = setting(
        "", "loremflickr: photos matching all keywords, or any of them.", flag="--match"
    )
    gray: bool = setting(False, "loremflickr: grayscale photos (the /g/ prefix).", flag="--gray")
    urls: str = setting(
        "",
        "Fetch the URLs in FILE instead of a template: one per line (# comments), or a "
        "CSV/TSV with a url column; - reads stdin. -n is ignored.",
        flag="--urls",
        metavar="FILE",
    )
    unique: bool = setting(
        False,
        "Keep fetching until N images with distinct content are on disk (bounded).",
        flag="--unique",
    )
    name_template: str = setting(
        "",
        "File names, e.g. '{index:05d}-{sha8}{ext}'. Fields: index, stem (remote name), "
        "sha8, sha256, ext, width, height.",
        flag="--name-template",
        metavar="T",
        default_text="'{index:06d}-{stem}{ext}'",
    )
    local: bool = setting(
        False, "Fetch from the built-in server (no internet needed).", flag="--local"
    )
    progress: bool = setting(
        True,
        "No progress bar; only the summary line.",
        flag="--quiet",
        short="-q",
        flag_value=False,
    )
    resume: bool = setting(
        False,
        "Keep images the manifest records as ok (file intact, same sha256); fetch the rest.",
        flag="--resume",
    )
    retry_failed: bool = setting(
        False, "Re-run only the images the manifest records as failed.", flag="--retry-failed"
    )
    event_loop: EventLoop = setting(
        "auto", "asyncio and hybrid: auto (uvloop when installed) or asyncio's own loop."
    )
    workers: int = setting(
        0,
        "hybrid backend: event-loop processes sharing the connections.",
        flag="--workers",
        low=0,
        default_text="1 per core",
    )
    verify: Verify = setting(
        "full",
        "full: decode every image. header: without thumbnails, decode none; check the header "
        "(format, size, bomb guard), magic bytes, Content-Length and the end marker (misses "
        "corrupt data between header and end; refuses data after a JPEG's end).",
        flag="--verify",
    )
    timeline: bool = setting(
        False,
        "Record each image's wait, cpu and write spans, and where they ran (--timeline FILE "
        "draws them).",
    )
    http: HttpSettings = field(default_factory=HttpSettings)
    thumbnails: ThumbnailSettings = field(default_factory=ThumbnailSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    dask: DaskSettings = field(default_factory=DaskSettings)
    service: ServiceSettings = field(default_factory=ServiceSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)

    def __post_init__(self) -> None:
        # The Python API builds Settings directly: a str path is fine, a str count is not.
        # An --out URL becomes ``store``, and ``out`` its local state folder: everything
        # that reads the manifest or takes OUT's lock still reads a folder.
        from .stores import check_url, is_url, state_folder

        if is_url(self.out):
            url = check_url(str(self.out))
            object.__setattr__(self, "store", url)
            object.__setattr__(self, "out", state_folder(url, self.state))
        elif isinstance(self.out, str):
            object.__setattr__(self, "out", Path(self.out))
        if is_url(self.store):
            object.__setattr__(self, "store", check_url(self.store))
        super().__post_init__()

    def check(self) -> None:
        check(
            not (self.urls == "-" and (self.resume or self.retry_failed)),
            "--resume and --retry-failed need a URL list file, not stdin",
        )
        check(not (self.urls and self.local), "--local serves URL templates, not --urls lists")
        check(
            not (self.unique and self.dataset.shards),
            "--unique works with --output-format files only",
        )
        if self.store:
            from .stores import is_url

            check(is_url(self.store), f"store must be a URL (s3://BUCKET/PREFIX): {self.store!r}")
            check(
                self.dataset.shards,
                f"--out {self.store}: a URL takes the shard formats, --output-format "
                "webdataset or parquet (files output needs a folder)",
            )
            check(
                self.thumbnails.size == 0,
                f"--out {self.store}: thumbnails are files in a folder; use --thumbnail-size 0",
            )
        if self.name_template:
            from .storage import check_name_template

            check_name_template(self.name_template)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------- declarations

SECTIONS: dict[str, Any] = {
    "http": HttpSettings,
    "thumbnails": ThumbnailSettings,
    "server": ServerSettings,
    "dask": DaskSettings,
    "service": ServiceSettings,
    "dataset": DatasetSettings,
}


@dataclass(frozen=True)
class Declared:
    """One setting as the loaders and the CLI see it."""

    key: str  # dotted: "http.timeout"
    kind: Any  # int, float, str, bool, Path, or a Literal (without "| None": ``bare``)
    default: Any
    meta: Setting

    @property
    def env(self) -> str:
        return "DOWNLOADER_" + self.key.upper().replace(".", "_")

    @property
    def choices(self) -> tuple[str, ...]:
        return typing.get_args(self.kind) if typing.get_origin(self.kind) is Literal else ()


def declared() -> Iterator[Declared]:
    """Every setting, top-level keys first, then each section's."""
    yield from declarations(Settings)
    for section, cls in SECTIONS.items():
        yield from declarations(cls, f"{section}.")


def declarations(cls: Any, prefix: str = "") -> Iterator[Declared]:
    """The settings declared in the dataclass ``cls`` (a section, or a command's own
    options such as ``scenarios.CompareSettings``), their keys under ``prefix``."""
    for spec in dataclasses.fields(cls):
        meta = meta_of(cls, spec.name)
        if meta is not None:
            yield Declared(prefix + spec.name, bare(hints(cls)[spec.name]), spec.default, meta)


@functools.cache
def known_keys() -> dict[str, Any]:
    """Every dotted key and the type its value must have."""
    return {d.key: d.kind for d in declared()}
