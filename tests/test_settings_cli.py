"""Settings layering (default < file < env < flags) and the CLI's one-line usage errors."""

from __future__ import annotations

import tomllib
import typing
from pathlib import Path

import pytest
from helpers import invoke

from downloader.backends import BACKENDS as REGISTRY
from downloader.backends import BackendName
from downloader.choices import BACKEND_NAMES as BACKENDS
from downloader.cli import main
from downloader.config import default_config_text, flatten, load_settings
from downloader.errors import ConfigError
from downloader.settings import (
    DEFAULT_URL,
    FAULTS,
    ServerSettings,
    Settings,
    declared,
    known_keys,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scrubbed_env: None) -> Path:
    """No DOWNLOADER_* from the developer's shell, and a scratch working folder."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------- layering


def test_defaults_match_the_dataclasses() -> None:
    """default.toml and the declarations in settings.py agree on every value."""
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.count == 10
    assert settings.backend == "asyncio"
    assert settings.url == DEFAULT_URL
    assert settings.out == Path("pic")


def test_config_file_overrides_defaults(tmp_path: Path) -> None:
    config = write(
        tmp_path / "c.toml",
        'backend = "threads"\ncount = 20\nout = "images"\n'
        "[http]\ntimeout = 5\nretries = 1\n[thumbnails]\nsize = 0\n",
    )
    settings = load_settings(config, environ={})
    assert settings.backend == "threads"
    assert settings.count == 20
    assert settings.out == Path("images")
    assert settings.http.timeout == 5.0
    assert isinstance(settings.http.timeout, float)
    assert settings.http.retries == 1
    assert settings.thumbnails.size == 0
    # Untouched keys keep their defaults.
    assert settings.http.concurrency == 32
    assert settings.width == 320


def test_env_overrides_config_file(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", 'backend = "threads"\ncount = 20\n[http]\ntimeout = 5\n')
    environ = {
        "DOWNLOADER_COUNT": "30",
        "DOWNLOADER_HTTP_RETRIES": "7",
        "DOWNLOADER_PROGRESS": "off",
        "DOWNLOADER_THUMBNAILS_EXECUTOR": "inline",
        "HOME": "/ignored",  # other variables are none of our business
    }
    settings = load_settings(config, environ=environ)
    assert settings.count == 30
    assert settings.http.retries == 7
    assert settings.progress is False
    assert settings.thumbnails.executor == "inline"
    assert settings.backend == "threads"  # from the file, env did not set it
    assert settings.http.timeout == 5.0


def test_flags_override_env(tmp_path: Path) -> None:
    config = write(tmp_path / "c.toml", "count = 20\n[http]\ntimeout = 5\n")
    settings = load_settings(
        config,
        environ={"DOWNLOADER_COUNT": "30", "DOWNLOADER_HTTP_TIMEOUT": "9"},
        overrides={"count": 40, "http.retries": 0, "backend": None, "http.timeout": None},
    )
    assert settings.count == 40
    assert settings.http.retries == 0
    assert settings.http.timeout == 9.0  # a None flag does not override
    assert settings.backend == "asyncio"


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOWNLOADER_BACKEND", "sync")
    assert load_settings().backend == "sync"


@pytest.mark.parametrize(
    ("environ", "fragment"),
    [
        ({"DOWNLOADER_NOPE": "1"}, "DOWNLOADER_NOPE"),
        ({"DOWNLOADER_COUNT": "abc"}, "count"),
        ({"DOWNLOADER_PROGRESS": "maybe"}, "progress"),
        ({"DOWNLOADER_HTTP_TIMEOUT": "soon"}, "http.timeout"),
        ({"DOWNLOADER_COUNT": "0"}, "count"),
        ({"DOWNLOADER_BACKEND": "nope"}, "backend"),
    ],
)
def test_bad_env_is_config_error(environ: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(environ=environ)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("nope = 1\n", "nope"),
        ("[http]\nnope = 1\n", "http.nope"),
        ("[nope]\nx = 1\n", "nope"),
        ('count = "x"\n', "count"),
        ("count = true\n", "count"),
        ("count = 1.5\n", "count"),
        ("local = 1\n", "local"),
        ('[http]\ntimeout = "fast"\n', "http.timeout"),
        ("count = [\n", "malformed TOML"),
        ("http = 3\n", "http"),
    ],
)
def test_bad_config_file_is_config_error(tmp_path: Path, text: str, fragment: str) -> None:
    config = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ={})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_config_file_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "missing.toml", environ={})


def test_default_toml_knows_every_key() -> None:
    """The shipped file documents every key, so it must set each one the dataclasses have."""
    assert set(flatten(tomllib.loads(default_config_text()), "default.toml")) == set(known_keys())


def test_config_default_toml_is_the_packaged_one() -> None:
    """config/default.toml (what a reader of the checkout sees) and the packaged defaults
    are one text: a key changed in one and not the other fails here."""
    shipped = Path(__file__).resolve().parents[1] / "config" / "default.toml"
    assert shipped.read_text(encoding="utf-8") == default_config_text()


# ---------------------------------------------------------------------------- CLI


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def write_configs(folder: Path) -> None:
    write(folder / "malformed.toml", "count = [\n")
    write(folder / "unknown.toml", "nope = 1\n")
    write(folder / "wrongtype.toml", 'count = "x"\n')
    write(folder / "afile", "I am a file, not a folder\n")


BAD_INPUTS = [
    pytest.param(["-n", "0"], None, "count", id="count-zero"),
    pytest.param(["-n", "-5"], None, "count", id="count-negative"),
    pytest.param(["-n", "abc"], None, "abc", id="count-not-int"),
    pytest.param(["--backend", "nope"], None, ", ".join(BACKENDS), id="bad-backend"),
    pytest.param(["--config", "missing.toml"], None, "missing.toml", id="config-missing"),
    pytest.param(["--config", "malformed.toml"], None, "malformed.toml", id="config-malformed"),
    pytest.param(["--config", "unknown.toml"], None, "nope", id="config-unknown-key"),
    pytest.param(["--config", "wrongtype.toml"], None, "count", id="config-wrong-type"),
    pytest.param(["--concurrency", "0"], None, "concurrency", id="concurrency-zero"),
    pytest.param(["--timeout", "-1"], None, "timeout", id="timeout-negative"),
    pytest.param(
        ["--url", "example.com/{i}"],
        None,
        "http",
        id="url-no-scheme",
    ),
    pytest.param(
        ["--url", "http://h/{nope}"],
        None,
        "{nope}",
        id="url-unknown-placeholder",
    ),
    pytest.param(["--out", "afile"], None, "afile", id="out-is-a-file"),
    pytest.param([], {"DOWNLOADER_NOPE": "1"}, "DOWNLOADER_NOPE", id="unknown-env-var"),
    pytest.param(["--frobnicate"], None, "--frobnicate", id="unknown-flag"),
    pytest.param(["--size", "big"], None, "big", id="bad-size"),
    pytest.param(["--retries", "-1"], None, "retries", id="retries-negative"),
    pytest.param(["--retries", "1000000000"], None, "between 0 and 100", id="retries-huge"),
]


@pytest.mark.parametrize(("args", "env", "fragment"), BAD_INPUTS)
def test_bad_input_is_one_error_line(
    tmp_path: Path, args: list[str], env: dict[str, str] | None, fragment: str
) -> None:
    write_configs(tmp_path)
    before = listing(tmp_path)

    result = invoke(*args, env=env)

    assert result.exit_code == 2, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), result.output
    assert fragment in lines[0]
    assert result.stderr == result.output  # the error goes to stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    # Nothing was created: no OUT, no manifest, no thumbnails folder.
    assert listing(tmp_path) == before
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "I am a file, not a folder\n"


def test_help_lists_every_option() -> None:
    result = invoke("--help")
    assert result.exit_code == 0
    assert result.stderr == ""
    for option in [
        "--count",
        "--backend",
        "--url",
        "--out",
        "--concurrency",
        "--timeout",
        "--retries",
        "--thumbnail-size",
        "--config",
        "--local",
        "--latency-ms",
        "--jitter-ms",
        "--verbose",
        "--quiet",
    ]:
        assert option in result.stdout, option
    for backend in BACKENDS:
        assert backend in result.stdout


def test_help_writes_nothing(tmp_path: Path) -> None:
    result = invoke("-h")
    assert result.exit_code == 0 and "Usage:" in result.stdout, result.output
    assert listing(tmp_path) == set()


def test_version_exits_zero() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.output


# ---------------------------------------------------------------------------- declarations


def test_backend_names_are_the_registry() -> None:
    assert set(typing.get_args(BackendName)) == set(REGISTRY)
    assert known_keys()["backend"] is BackendName


def test_every_fault_kind_is_a_setting_and_a_flag() -> None:
    rates = dict(ServerSettings().fault_rates())
    assert set(rates) == set(FAULTS)
    help_text = invoke("serve", "--help").stdout
    for kind in FAULTS:
        assert f"--{kind}-rate" in help_text


def test_every_declared_flag_is_an_option_with_its_default() -> None:
    help_text = " ".join(invoke("--help").stdout.split())
    for item in declared():
        if item.meta.flag is None or "download" not in item.meta.commands:
            continue
        assert item.meta.flag in help_text, item.key
    assert "--concurrency INTEGER Downloads in flight (processes: worker count). [default: 32]" in (
        help_text
    )


@pytest.mark.parametrize(
    ("args", "key", "value"),
    [
        (["--rate", "2.5/s"], "http.rate", 2.5),
        (["-q"], "progress", False),
        (["--gray"], "gray", True),
        (["--size", "64x48"], "width", 64),
        (["--latency-ms", "7"], "server.latency_ms", 7.0),
    ],
)
def test_flags_reach_their_settings(args: list[str], key: str, value: object) -> None:
    from downloader.cli import settings_from_options

    context = main.make_context("download", list(args))
    settings = settings_from_options(dict(context.params))
    section, _, name = key.rpartition(".")
    assert getattr(getattr(settings, section) if section else settings, name) == value


def test_unusable_host_in_a_template_is_a_usage_error(tmp_path: Path) -> None:
    result = invoke("--url", "http://a..b/{i}.jpg", "--out", str(tmp_path / "p"))
    code, stderr = result.exit_code, result.stderr
    assert code == 2 and stderr.startswith("error:") and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--timeout", "inf"],
        ["--timeout", "1e300"],
        ["--rate", "1e-300"],
        ["--rate", "nan"],
    ],
)
def test_non_finite_numbers_are_usage_errors(args: list[str], tmp_path: Path) -> None:
    result = invoke(*args, "-n", "1", "--out", str(tmp_path / "pic"))
    code, stderr = result.exit_code, result.stderr
    assert code == 2 and stderr.startswith("error:") and len(stderr.splitlines()) == 1


def test_local_server_that_cannot_listen_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOWNLOADER_SERVER_HOST", "192.0.2.1")  # TEST-NET: not ours to bind
    result = invoke("-n", "1", "--local", "--out", str(tmp_path / "pic"), "-q")
    code, stderr = result.exit_code, result.stderr
    assert code == 2 and "could not listen" in stderr and "Traceback" not in stderr
