"""A daemon's background task that raises is logged and run again, not left dead while the daemon answers.

The layer builder once died on a timeline deleted under it, and every later wait for layers timed out.
"""

import asyncio
import logging

from neonctl.engine.daemon import supervise


def test_a_failed_background_task_runs_again_and_is_logged(caplog):
    calls = []

    async def flaky(stop: asyncio.Event) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise FileNotFoundError("timeline directory moved away")
        await stop.wait()

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(supervise(flaky, stop, delay=0.01))
        for _ in range(200):
            if len(calls) >= 3:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(task, 1)

    with caplog.at_level(logging.ERROR):
        asyncio.run(main())
    assert len(calls) == 3
    failures = [r for r in caplog.records if "failed; it runs again" in r.getMessage()]
    assert len(failures) == 2 and "moved away" in failures[0].exc_text


def test_a_task_that_returns_is_not_restarted_and_stop_ends_the_wait():
    calls = []

    async def once(stop: asyncio.Event) -> None:
        calls.append(1)

    async def always_fails(stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        stop = asyncio.Event()
        await asyncio.wait_for(supervise(once, stop, delay=0.01), 1)
        failing = asyncio.create_task(supervise(always_fails, stop, delay=30))
        await asyncio.sleep(0.05)
        stop.set()  # wakes the 30 s delay at once
        await asyncio.wait_for(failing, 1)

    asyncio.run(main())
    assert calls == [1]
