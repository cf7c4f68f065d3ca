"""copying.Publisher: the windows of a run are published in order on a thread of their own while
the next ones are written; failures stop the run and leave nothing half-published."""

import threading

import pyarrow as pa
import pytest

from incremental_assets.copying import Publisher, SliceCopy
from incremental_assets.landing import LandingError
from incremental_assets.landing.local import LocalLandingStore

from .helpers import local_publish_fails

SCHEMA = pa.schema([("id", pa.int64())])


@pytest.fixture
def store(tmp_path):
    return LocalLandingStore(tmp_path / "landing", create=True)


def _staged(store, i: int):
    """Window ``p<i>``'s file, written and not yet durable nor visible."""
    batch = pa.record_batch([pa.array([i, i + 100], pa.int64())], schema=SCHEMA)
    stage = store.stage_slice("t", f"p{i}", "s", SCHEMA, [batch], durable=False)
    copy = SliceCopy(f"p{i}", None, None, rows=stage.rows)
    return copy, stage


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def gate(monkeypatch):
    """Publications wait for ``gate.set()``; ``gate.started`` is set once the first one waits."""
    gate, gate.started = threading.Event(), threading.Event()
    publish = LocalLandingStore._publish

    def slow(self, temp, path, *a):
        gate.started.set()
        assert gate.wait(10)
        return publish(self, temp, path, *a)

    monkeypatch.setattr(LocalLandingStore, "_publish", slow)
    return gate


def test_windows_are_published_in_order_each_made_durable_first(store, tmp_path, monkeypatch):
    calls = []
    sync_temp, publish = LocalLandingStore._sync_temp, LocalLandingStore._publish
    monkeypatch.setattr(LocalLandingStore, "_sync_temp", lambda self, temp, *a: (calls.append(("sync", temp)), sync_temp(self, temp, *a)))
    monkeypatch.setattr(LocalLandingStore, "_publish", lambda self, temp, path, *a: (calls.append(("rename", temp)), publish(self, temp, path, *a)))
    landed = []
    publisher = Publisher(store, table="t", replace=False, landed=lambda copy: landed.append((copy.partition, threading.current_thread())))
    for i in range(10):
        publisher.submit(*_staged(store, i))
    copies = publisher.finish()
    publisher.close()
    assert [c.partition for c in copies] == [f"p{i}" for i in range(10)]
    assert landed == [(f"p{i}", threading.main_thread()) for i in range(10)]  # in order, in the caller's thread
    assert _files(tmp_path / "landing") == [f"t/p{i}/s.parquet" for i in range(10)]
    assert [c.files[0].rows for c in copies] == [2] * 10
    # every file was made durable before it was renamed into sight
    assert [kind for kind, _ in calls] == ["sync", "rename"] * 10
    assert all(calls[k][1] == calls[k + 1][1] for k in range(0, 20, 2))


def test_at_most_AHEAD_windows_wait_for_publication(store, gate):
    publisher = Publisher(store, table="t", replace=False, landed=None)
    staged = [_staged(store, i) for i in range(Publisher.AHEAD + 1)]
    submitted = []

    def submit_all():
        for copy, stage in staged:
            publisher.submit(copy, stage)
            submitted.append(copy.partition)

    caller = threading.Thread(target=submit_all)
    caller.start()
    assert gate.started.wait(10)
    caller.join(0.5)
    assert caller.is_alive() and len(submitted) == Publisher.AHEAD  # the next one waits for the first
    gate.set()
    caller.join(10)
    assert len(submitted) == Publisher.AHEAD + 1
    assert len(publisher.finish()) == Publisher.AHEAD + 1


def test_a_failed_publication_stops_the_later_windows(store, tmp_path, monkeypatch):
    local_publish_fails(monkeypatch, "p2")
    landed = []
    publisher = Publisher(store, table="t", replace=False, landed=lambda copy: landed.append(copy.partition))
    with pytest.raises(LandingError, match=r"No space left on device.*p2"):
        try:
            for i in range(6):
                publisher.submit(*_staged(store, i))
            publisher.finish()
        finally:
            publisher.close()
    assert landed == ["p0", "p1"]
    # the windows before the failure are published whole; nothing of the others, no temp file
    assert _files(tmp_path / "landing") == ["t/p0/s.parquet", "t/p1/s.parquet"]


def test_after_the_callers_failure_waiting_windows_are_discarded(store, tmp_path, gate):
    landed = []
    publisher = Publisher(store, table="t", replace=False, landed=lambda copy: landed.append(copy.partition))
    for i in range(3):
        publisher.submit(*_staged(store, i))
    assert gate.started.wait(10)  # p0 is being published; p1 and p2 wait
    threading.Timer(0.2, gate.set).start()
    publisher.close()  # the caller failed: the run stops
    assert landed == ["p0"]  # published whole before the stop, and said so
    assert _files(tmp_path / "landing") == ["t/p0/s.parquet"]


def test_the_windows_seconds_add_up_to_the_runs_time(store, monkeypatch):
    """A window's seconds count the caller's wait for its publication, not the publication itself,
    which overlapped the writing of the next windows: the run's log and metadata add them up."""
    import time

    publish = LocalLandingStore._publish
    monkeypatch.setattr(LocalLandingStore, "_publish", lambda self, *a: (time.sleep(0.05), publish(self, *a)))
    publisher = Publisher(store, table="t", replace=False, landed=None)
    started = time.perf_counter()
    for i in range(10):
        publisher.submit(*_staged(store, i))
    copies = publisher.finish()
    wall = time.perf_counter() - started
    assert wall >= 0.5
    assert 0.5 * wall <= sum(c.seconds for c in copies) <= wall
