"""resume.plan: what a resumed run keeps, carries and runs again, decided from records."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from downloader.jobs import Template
from downloader.result import Result
from downloader.resume import Plan, plan
from downloader.settings import Settings

URL = "http://h/{i}"


def ok(index: int, sha: str = "", url: str = "") -> Result:
    return Result(
        index=index,
        url=url or URL.format(i=index),
        status="ok",
        path=f"{index}.jpg",
        sha256=sha or f"sha{index}",
    )


def failed(index: int, error: str = "503") -> Result:
    return Result(index=index, url=URL.format(i=index), status="failed", error=error)


def urls_for(indices: Collection[int]) -> dict[int, str]:
    return {i: URL.format(i=i) for i in indices}


def settings(**changes: object) -> Settings:
    return Settings(count=4, url=URL, out=Path("unused"), resume=True).replace(**changes)


def test_resume_keeps_intact_ok_records_and_reruns_the_rest() -> None:
    records = {0: ok(0), 1: failed(1), 2: ok(2), 3: ok(3, url="http://other/3"), 9: ok(9)}
    result = plan(settings(), records, urls_for, intact=lambda r: r.index != 2)
    assert set(result.kept) == {0}
    assert set(result.carried) == {9}  # beyond -n: carried as it is
    assert set(result.stale) == {1, 2, 3}
    assert result.rerun is None
    assert [job.index for job in result.jobs(Template(URL, 1, 1, "", count=4))] == [1, 2, 3]
    assert result.to_run(settings()) == 3
    assert [r.index for r in result.lines] == [9, 0]


def test_retry_failed_reruns_only_recorded_indices() -> None:
    records = {0: ok(0), 2: failed(2)}
    result = plan(settings(retry_failed=True, resume=False), records, urls_for, lambda r: True)
    assert result.rerun == frozenset({2})
    assert [job.index for job in result.jobs(Template(URL, 1, 1, "", count=4))] == [2]
    assert result.to_run(settings()) == 1


def test_unique_keeps_one_record_per_image_and_carries_nothing() -> None:
    records = {0: ok(0, "a"), 1: ok(1, "a"), 2: ok(2, "b"), 7: ok(7, "c")}
    result = plan(settings(unique=True), records, urls_for, lambda r: True)
    assert set(result.kept) == {0, 2, 7}  # 7: an extra round's image, still the run's own
    assert set(result.stale) == {1}
    assert result.carried == {}


def test_no_records_is_a_fresh_start() -> None:
    assert plan(settings(), {}, urls_for, lambda r: True) == Plan()
