"""The aggregator's state on a disk that fills up or turns read-only: a real small file system
(a tmpfs mounted for the test) really filled, never a mocked ``OSError``.

What must hold: the write that fails changes nothing (the registry rolls back, the model store
keeps its last committed version and no stray file), the error names the path, the running
aggregator stops with it (devices are told ``UNAVAILABLE`` and retry), and a restart on a disk
with room resumes from the last committed version.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

grpc = pytest.importorskip("grpc")

from aggregator_harness import (DIM, get_task, md, running_aggregator, start_round,  # noqa: E402
                                upload)
from shoal.params import ParamSpec  # noqa: E402
from shoal.registry import SQLiteRegistry  # noqa: E402
from shoal.store import Checkpoint, ModelStore  # noqa: E402
from shoal.store.disk import StorageError  # noqa: E402
from shoal.strategy import ServerState  # noqa: E402
from shoal.transport.proto import shoal_pb2 as pb  # noqa: E402
from shoal.transport.server import AggregatorSettings  # noqa: E402


class Disk:
    """A small tmpfs at ``path``: filled, freed and remounted on demand."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / ".filler"

    def fill(self) -> None:
        """Write until the file system has no byte left."""
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)


@pytest.fixture()
def disk(tmp_path):
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs",
                           str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"these tests fill a real file system: mounting a tmpfs needs root with "
                    f"CAP_SYS_ADMIN ({done.stderr.strip()})")
    yield Disk(path)
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _checkpoint(value: float, size: int = DIM) -> Checkpoint:
    return Checkpoint(state=ServerState(params=np.full(size, value, np.float32), version=1),
                      spec=ParamSpec.from_shapes({"w": (size,)}), seed=0)


def test_a_full_disk_fails_a_registry_write_with_its_path_and_changes_nothing(disk):
    registry = SQLiteRegistry(disk.path / "registry.db")
    for d in ("a", "b", "c"):
        registry.enroll(d, now=1.0)
    disk.fill()
    with pytest.raises(StorageError) as info:
        for i in range(100):  # the write-ahead log may hold a page or two
            registry.enroll(f"new-{i}", now=2.0, attributes={"note": "x" * 200})
    assert info.value.path == str(disk.path / "registry.db")
    assert "the disk is full" in str(info.value) and str(disk.path) in str(info.value)
    count = registry.count()
    disk.free()
    registry.enroll("after", now=3.0)  # writable again, nothing half-written
    assert registry.count() == count + 1
    assert registry.get("a").enrolled_at == 1.0


def test_a_model_store_commit_on_a_full_disk_leaves_the_store_as_it_was(disk):
    store = ModelStore(disk.path)
    first = store.commit(_checkpoint(1.0), round=1, metrics={}, now=1.0)
    before = sorted(p.name for p in (disk.path / "models").iterdir())
    disk.fill()
    big = _checkpoint(1.0, size=1 << 20)  # 4 MiB: cannot fit
    with pytest.raises(StorageError) as info:
        store.commit(big, round=2, metrics={}, parent=first.id, now=2.0)
    assert str(disk.path / "models") in str(info.value) and "full" in info.value.cause
    assert [v.id for v in store.list()] == [first.id]
    assert sorted(p.name for p in (disk.path / "models").iterdir()) == before
    disk.free()
    second = store.commit(_checkpoint(2.0), round=2, metrics={}, parent=first.id, now=3.0)
    np.testing.assert_array_equal(store.load(second.id).state.params, np.full(DIM, 2.0))
    store.close()


def test_a_read_only_disk_is_a_clear_error_when_the_state_is_opened(disk):
    SQLiteRegistry(disk.path / "registry.db").close()
    ModelStore(disk.path).close()
    disk.remount("ro")
    try:
        with pytest.raises(StorageError, match="read-only") as info:
            ModelStore(disk.path)
        assert str(disk.path / "models") in str(info.value)
        with pytest.raises(StorageError, match="read-only") as info:
            SQLiteRegistry(disk.path / "registry.db").enroll("a", now=1.0)
        assert info.value.path == str(disk.path / "registry.db")
    finally:
        disk.remount("rw")


def test_the_aggregator_stops_with_the_path_when_its_registry_disk_fills(tmp_path, disk):
    settings = AggregatorSettings()
    with running_aggregator(disk.path, settings) as (service, stub):
        t, out = start_round(service)
        task = get_task(stub, "dev-a")
        assert upload(stub, "dev-a", task, np.ones(DIM, np.float32)).accepted
        disk.fill()
        with pytest.raises(grpc.RpcError) as info:
            for _ in range(50):  # check-ins write the registry (last seen)
                stub.CheckIn(pb.CheckInRequest(device_id="dev-b"), metadata=md("dev-b"),
                             timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry.db" in info.value.details() and "full" in info.value.details()
        t.join(timeout=10)
        assert not t.is_alive()
        assert isinstance(out["error"], StorageError)  # the run stops with the disk's error
        assert out["error"].path == str(disk.path / "registry.db")
        # every later call is told to come back: the devices retry, nothing else happens
        with pytest.raises(grpc.RpcError) as info:
            stub.Hello(pb.HelloRequest(device_id="dev-c"), metadata=md("dev-c"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.slow
def test_a_deployment_whose_disk_fills_stops_cleanly_and_resumes_after_a_restart(tmp_path,
                                                                                disk):
    from shoal.cli.launch import stop_processes
    from test_deploy import THREE, _serve_with_clients, _spawn, _wait

    work = disk.path
    store_dir = work / "models"

    def versions() -> list[int]:
        if not (store_dir / "models" / "index.json").exists():
            return []
        with ModelStore(store_dir, readonly=True) as store:
            return [v.round for v in store.list()]

    server, clients, port, serve_args = _serve_with_clients(
        tmp_path, work, "rounds = 6\n" + THREE + "[deploy]\nover_selection = 1.0\n"
        "min_fraction = 1.0\ncheckin_interval_s = 0.3\ndeadline_s = 30.0")
    try:
        _wait(lambda: len(versions()) >= 2, 120, "two committed rounds")
        disk.fill()
        assert server.wait(timeout=60) == 1
        log = (tmp_path / "serve1.log").read_text()
        assert "shoal: error:" in log and str(work) in log and "the disk is full" in log
        kept = versions()
        assert kept == list(range(1, len(kept) + 1)) and len(kept) < 6
        disk.free()
        # room again: a restart resumes from the last committed version; the devices, which
        # were told UNAVAILABLE or found no server, reconnect by themselves
        server = _spawn(serve_args + ["--set", f"deploy.port={port}"],
                        tmp_path / "serve2.log")
        assert server.wait(timeout=180) == 0, (tmp_path / "serve2.log").read_text()
        summary = json.loads((tmp_path / "serve2.log").read_text().strip().splitlines()[-1])
        assert summary["rounds"] == 6
        assert versions() == list(range(1, 7))  # nothing committed was lost or redone
    finally:
        stop_processes(clients + [server])  # SIGTERM, then SIGKILL after 10 s
