"""``fetch_sync`` against ``responses`` mocks: what is retried, what is refused, what waits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
import responses
from helpers import FakeSleep

from downloader.errors import FetchError, InvalidImageError, RetryableFetchError
from downloader.fetch import (
    Fetched,
    check_declared_length,
    fetch_sync,
    new_session,
    parse_retry_after,
)
from downloader.settings import HttpSettings

URL = "http://images.test/photo/1.jpg"
JPEG = b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"x" * 200
FAST = HttpSettings(backoff=0.01, max_backoff=30, retries=3, timeout=5)


@pytest.fixture
def rsps() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock


@pytest.fixture
def sleep() -> FakeSleep:
    return FakeSleep()


def fetch(url: str = URL, http: HttpSettings = FAST, sleep: FakeSleep | None = None) -> Fetched:
    session = new_session(http)
    try:
        return fetch_sync(session, url, http, sleep=sleep if sleep is not None else FakeSleep())
    finally:
        session.close()


def test_ok_image_is_fetched_once(rsps: responses.RequestsMock, sleep: FakeSleep) -> None:
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = fetch(sleep=sleep)
    assert fetched.data == JPEG
    assert fetched.attempts == 1
    assert fetched.url == URL
    assert fetched.final_url == URL
    assert fetched.content_type.startswith("image/jpeg")
    assert len(rsps.calls) == 1
    assert sleep.calls == []


def test_user_agent_is_sent(rsps: responses.RequestsMock) -> None:
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetch()
    assert rsps.calls[0].request.headers["User-Agent"] == FAST.user_agent


def test_503_then_200_is_retried(rsps: responses.RequestsMock, sleep: FakeSleep) -> None:
    rsps.get(URL, status=503)
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = fetch(sleep=sleep)
    assert len(rsps.calls) == 2
    assert fetched.attempts == 2
    assert fetched.data == JPEG
    assert len(sleep.calls) == 1


@pytest.mark.parametrize("status", [404, 403, 400, 410])
def test_other_4xx_is_not_retried(
    rsps: responses.RequestsMock, sleep: FakeSleep, status: int
) -> None:
    rsps.get(URL, status=status)
    rsps.get(URL, body=JPEG, content_type="image/jpeg")  # must never be reached
    with pytest.raises(FetchError) as info:
        fetch(sleep=sleep)
    assert not isinstance(info.value, RetryableFetchError)
    assert str(status) in str(info.value)
    assert info.value.attempts == 1
    assert len(rsps.calls) == 1
    assert sleep.calls == []


def test_429_retry_after_is_honoured(rsps: responses.RequestsMock, sleep: FakeSleep) -> None:
    rsps.get(URL, status=429, headers={"Retry-After": "7"})
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = fetch(http=HttpSettings(backoff=0.01, max_backoff=30), sleep=sleep)
    assert fetched.attempts == 2
    assert len(sleep.calls) == 1
    assert sleep.calls[0] >= 7


def test_retry_after_is_capped_at_max_backoff(
    rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    rsps.get(URL, status=503, headers={"Retry-After": "3600"})
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetch(http=HttpSettings(backoff=0.01, max_backoff=2), sleep=sleep)
    assert len(sleep.calls) == 1
    assert sleep.calls[0] <= 2


def test_backoff_without_retry_after_stays_under_cap(
    rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    http = HttpSettings(backoff=0.5, max_backoff=1, retries=5)
    for _ in range(5):
        rsps.get(URL, status=500)
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = fetch(http=http, sleep=sleep)
    assert fetched.attempts == 6
    assert len(sleep.calls) == 5
    assert all(0 <= s <= 1 for s in sleep.calls)


@pytest.mark.parametrize(
    "exc",
    [
        requests.exceptions.ReadTimeout("read timed out"),
        requests.exceptions.ConnectTimeout("connect timed out"),
        requests.exceptions.ConnectionError("connection reset by peer"),
        requests.exceptions.ChunkedEncodingError("truncated body"),
    ],
    ids=["read-timeout", "connect-timeout", "connection-error", "chunked-encoding"],
)
def test_transient_errors_are_retried(
    rsps: responses.RequestsMock, sleep: FakeSleep, exc: Exception
) -> None:
    rsps.get(URL, body=exc)
    rsps.get(URL, body=JPEG, content_type="image/jpeg")
    fetched = fetch(sleep=sleep)
    assert fetched.attempts == 2
    assert len(rsps.calls) == 2
    assert len(sleep.calls) == 1


def test_timeout_message_is_one_line(rsps: responses.RequestsMock) -> None:
    rsps.get(URL, body=requests.exceptions.ReadTimeout("read timed out"))
    with pytest.raises(RetryableFetchError) as info:
        fetch(http=HttpSettings(retries=0, timeout=5))
    assert "timed out" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_exhausted(rsps: responses.RequestsMock, sleep: FakeSleep, retries: int) -> None:
    rsps.get(URL, status=503)  # the last registered response repeats
    with pytest.raises(RetryableFetchError) as info:
        fetch(http=HttpSettings(backoff=0, retries=retries), sleep=sleep)
    assert info.value.attempts == retries + 1
    assert len(rsps.calls) == retries + 1
    assert len(sleep.calls) == retries


def test_html_body_is_invalid_image(rsps: responses.RequestsMock, sleep: FakeSleep) -> None:
    rsps.get(URL, body="<html><body>nope</body></html>", content_type="text/html")
    with pytest.raises(InvalidImageError) as info:
        fetch(sleep=sleep)
    assert "text/html" in str(info.value)
    assert info.value.attempts == 1
    assert len(rsps.calls) == 1


def test_empty_body_is_invalid_image(rsps: responses.RequestsMock) -> None:
    rsps.get(URL, body=b"", content_type="image/jpeg")
    with pytest.raises(InvalidImageError):
        fetch()


def test_declared_length_over_cap_is_refused(
    rsps: responses.RequestsMock, sleep: FakeSleep
) -> None:
    body = b"\xff\xd8\xff" + b"x" * 197
    rsps.get(URL, body=body, content_type="image/jpeg", headers={"Content-Length": "200"})
    with pytest.raises(InvalidImageError) as info:
        fetch(http=HttpSettings(max_bytes=100), sleep=sleep)
    assert "200" in str(info.value)  # refused on the declared length, before the body
    assert "100" in str(info.value)
    assert info.value.attempts == 1
    assert len(rsps.calls) == 1


def test_streamed_body_over_cap_is_refused(rsps: responses.RequestsMock) -> None:
    rsps.get(
        URL,
        body=b"\xff\xd8\xff" + b"x" * 500,
        content_type="image/jpeg",
        auto_calculate_content_length=False,
    )
    with pytest.raises(InvalidImageError):
        fetch(http=HttpSettings(max_bytes=100))
    assert len(rsps.calls) == 1


def test_body_at_cap_is_accepted(rsps: responses.RequestsMock) -> None:
    body = b"\xff\xd8\xff" + b"x" * 97
    rsps.get(URL, body=body, content_type="image/jpeg")
    assert fetch(http=HttpSettings(max_bytes=100)).data == body


@pytest.mark.parametrize("content_type", ["text/plain", "application/octet-stream", ""])
def test_mislabelled_jpeg_is_accepted(rsps: responses.RequestsMock, content_type: str) -> None:
    rsps.get(URL, body=JPEG, headers={"Content-Type": content_type})
    fetched = fetch()
    assert fetched.data == JPEG
    assert fetched.attempts == 1


def test_mislabelled_non_image_is_refused(rsps: responses.RequestsMock) -> None:
    rsps.get(URL, body=b"just some text", content_type="text/plain")
    with pytest.raises(InvalidImageError):
        fetch()


def test_redirect_gives_final_url(rsps: responses.RequestsMock) -> None:
    final = "http://cdn.test/real/name.jpg"
    rsps.get(URL, status=302, headers={"Location": final})
    rsps.get(final, body=JPEG, content_type="image/jpeg")
    fetched = fetch()
    assert fetched.url == URL
    assert fetched.final_url == final


def test_redirect_loop_is_final(rsps: responses.RequestsMock, sleep: FakeSleep) -> None:
    rsps.get(URL, status=302, headers={"Location": URL})
    with pytest.raises(FetchError) as info:
        fetch(http=HttpSettings(max_redirects=3), sleep=sleep)
    assert not isinstance(info.value, RetryableFetchError)
    assert "redirect" in str(info.value)
    assert info.value.attempts == 1
    assert sleep.calls == []


@pytest.mark.parametrize("value", ["²", "1" * 5000, "-1", "", "12a"])
def test_hostile_numeric_headers_are_ignored(value: str) -> None:
    assert check_declared_length(value, 10) is None
    assert parse_retry_after(value) is None
