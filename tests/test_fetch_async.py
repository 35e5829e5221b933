"""``fetch_async`` against ``aioresponses`` mocks: what is retried, what is refused, what waits."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from helpers import FakeAsyncSleep

from downloader.errors import FetchError, InvalidImageError, RetryableFetchError
from downloader.fetch import Fetched, fetch_async
from downloader.settings import HttpSettings

URL = "http://images.test/photo/1.jpg"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"x" * 200
FAST = HttpSettings(backoff=0.01, max_backoff=30, retries=3, timeout=5)


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without the ``stream_writer`` argument that
    aiohttp 3.14 made required (pnuckowski/aioresponses#289); supply an inert one."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


_NEEDS_STREAM_WRITER = "stream_writer" in inspect.signature(aiohttp.ClientResponse).parameters


class _Mock(aioresponses):
    def add(self, url: Any, method: str = "GET", **kwargs: Any) -> None:  # type: ignore[override]
        if _NEEDS_STREAM_WRITER and kwargs.get("response_class") is None:
            kwargs["response_class"] = _Response
        super().add(url, method, **kwargs)


@pytest.fixture
def mock() -> Iterator[aioresponses]:
    with _Mock() as m:
        yield m


@pytest.fixture
def sleep() -> FakeAsyncSleep:
    return FakeAsyncSleep()


def seen(m: aioresponses) -> int:
    """How many requests aioresponses saw, whatever their URL."""
    return sum(len(calls) for calls in m.requests.values())


async def fetch(
    url: str = URL, http: HttpSettings = FAST, sleep: FakeAsyncSleep | None = None
) -> Fetched:
    async with aiohttp.ClientSession() as session:
        return await fetch_async(session, url, http, sleep=sleep if sleep else FakeAsyncSleep())


async def test_ok_image_is_fetched_once(mock: aioresponses, sleep: FakeAsyncSleep) -> None:
    mock.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = await fetch(sleep=sleep)
    assert fetched.data == JPEG
    assert fetched.attempts == 1
    assert fetched.url == URL
    assert fetched.final_url == URL
    assert fetched.content_type.startswith("image/jpeg")
    assert seen(mock) == 1
    assert sleep.calls == []


async def test_503_then_200_is_retried(mock: aioresponses, sleep: FakeAsyncSleep) -> None:
    mock.get(URL, status=503)
    mock.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = await fetch(sleep=sleep)
    assert seen(mock) == 2
    assert fetched.attempts == 2
    assert fetched.data == JPEG
    assert len(sleep.calls) == 1


@pytest.mark.parametrize("status", [404, 403, 400, 410])
async def test_other_4xx_is_not_retried(
    mock: aioresponses, sleep: FakeAsyncSleep, status: int
) -> None:
    mock.get(URL, status=status)
    mock.get(URL, body=JPEG, content_type="image/jpeg")  # must never be reached
    with pytest.raises(FetchError) as info:
        await fetch(sleep=sleep)
    assert not isinstance(info.value, RetryableFetchError)
    assert str(status) in str(info.value)
    assert info.value.attempts == 1
    assert seen(mock) == 1
    assert sleep.calls == []


async def test_429_retry_after_is_honoured(mock: aioresponses, sleep: FakeAsyncSleep) -> None:
    mock.get(URL, status=429, headers={"Retry-After": "7"})
    mock.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = await fetch(http=HttpSettings(backoff=0.01, max_backoff=30), sleep=sleep)
    assert fetched.attempts == 2
    assert seen(mock) == 2
    assert len(sleep.calls) == 1
    assert sleep.calls[0] >= 7


async def test_retry_after_is_capped_at_max_backoff(
    mock: aioresponses, sleep: FakeAsyncSleep
) -> None:
    mock.get(URL, status=503, headers={"Retry-After": "3600"})
    mock.get(URL, body=JPEG, content_type="image/jpeg")
    await fetch(http=HttpSettings(backoff=0.01, max_backoff=2), sleep=sleep)
    assert len(sleep.calls) == 1
    assert sleep.calls[0] <= 2


@pytest.mark.parametrize(
    "exc",
    [
        TimeoutError(),  # asyncio.TimeoutError is TimeoutError since 3.11
        aiohttp.ClientConnectionError("connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("truncated body"),
    ],
    ids=["timeout", "connection-error", "server-disconnected", "payload-error"],
)
async def test_transient_errors_are_retried(
    mock: aioresponses, sleep: FakeAsyncSleep, exc: Exception
) -> None:
    mock.get(URL, exception=exc)
    mock.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = await fetch(sleep=sleep)
    assert fetched.attempts == 2
    assert seen(mock) == 2
    assert len(sleep.calls) == 1


async def test_timeout_message_is_one_line(mock: aioresponses) -> None:
    mock.get(URL, exception=TimeoutError())
    with pytest.raises(RetryableFetchError) as info:
        await fetch(http=HttpSettings(retries=0, timeout=5))
    assert "timed out" in str(info.value)
    assert "\n" not in str(info.value)


async def test_other_client_error_is_final(mock: aioresponses, sleep: FakeAsyncSleep) -> None:
    mock.get(URL, exception=aiohttp.InvalidURL(URL))
    with pytest.raises(FetchError) as info:
        await fetch(sleep=sleep)
    assert not isinstance(info.value, RetryableFetchError)
    assert info.value.attempts == 1
    assert sleep.calls == []


@pytest.mark.parametrize("retries", [0, 1, 3])
async def test_retries_exhausted(mock: aioresponses, sleep: FakeAsyncSleep, retries: int) -> None:
    mock.get(URL, status=503, repeat=True)
    with pytest.raises(RetryableFetchError) as info:
        await fetch(http=HttpSettings(backoff=0, retries=retries), sleep=sleep)
    assert info.value.attempts == retries + 1
    assert seen(mock) == retries + 1
    assert len(sleep.calls) == retries


async def test_html_body_is_invalid_image(mock: aioresponses, sleep: FakeAsyncSleep) -> None:
    mock.get(URL, body="<html><body>nope</body></html>", content_type="text/html")
    with pytest.raises(InvalidImageError) as info:
        await fetch(sleep=sleep)
    assert "text/html" in str(info.value)
    assert info.value.attempts == 1
    assert seen(mock) == 1


async def test_empty_body_is_invalid_image(mock: aioresponses) -> None:
    mock.get(URL, body=b"", content_type="image/jpeg")
    with pytest.raises(InvalidImageError):
        await fetch()


async def test_declared_length_over_cap_is_refused(
    mock: aioresponses, sleep: FakeAsyncSleep
) -> None:
    body = b"\xff\xd8\xff" + b"x" * 197
    mock.get(URL, body=body, content_type="image/jpeg", headers={"Content-Length": "200"})
    with pytest.raises(InvalidImageError) as info:
        await fetch(http=HttpSettings(max_bytes=100), sleep=sleep)
    assert "200" in str(info.value)  # refused on the declared length, before the body
    assert "100" in str(info.value)
    assert info.value.attempts == 1
    assert seen(mock) == 1


async def test_streamed_body_over_cap_is_refused(mock: aioresponses) -> None:
    mock.get(URL, body=b"\xff\xd8\xff" + b"x" * 500, content_type="image/jpeg")
    with pytest.raises(InvalidImageError):
        await fetch(http=HttpSettings(max_bytes=100))
    assert seen(mock) == 1


async def test_body_at_cap_is_accepted(mock: aioresponses) -> None:
    body = b"\xff\xd8\xff" + b"x" * 97
    mock.get(URL, body=body, content_type="image/jpeg")
    assert (await fetch(http=HttpSettings(max_bytes=100))).data == body


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream"])
async def test_mislabelled_jpeg_is_accepted(mock: aioresponses, content_type: str) -> None:
    mock.get(URL, body=JPEG, content_type=content_type)
    fetched = await fetch()
    assert fetched.data == JPEG
    assert fetched.attempts == 1


async def test_mislabelled_non_image_is_refused(mock: aioresponses) -> None:
    mock.get(URL, body=b"just some text", content_type="text/plain")
    with pytest.raises(InvalidImageError):
        await fetch()
