from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import shoal.store.model_index as index_mod
import shoal.store.model_versions as versions_mod
import shoal.store.models as models_mod
from shoal.errors import ConfigError, DataError, ShoalError
from shoal.params import ParamSpec
from shoal.store import Checkpoint, Store
from shoal.store.model_versions import (ModelEvent, ModelStoreError, PointerMoved, StoreLocked,
                                        UnknownVersion)
from shoal.store.models import ModelStore
from shoal.strategy import ServerState


def ckpt(round: int = 1, scale: float = 1.0) -> Checkpoint:
    params = (np.arange(6, dtype=np.float32) * np.float32(scale))
    return Checkpoint(state=ServerState(params=params, version=round),
                      spec=ParamSpec.from_shapes({"w": (2, 3)}), seed=3, meta={"run": "t"})


@pytest.fixture()
def store(tmp_path):
    s = ModelStore(tmp_path)
    yield s
    s.close()


def fill(store: ModelStore, n: int) -> None:
    for i in range(1, n + 1):
        store.commit(ckpt(i, float(i)), round=i, metrics={"accuracy": i / 10},
                     parent=i - 1 if i > 1 else None, now=1000.0 + i)


def statuses(store: ModelStore) -> dict[int, str]:
    return {v.id: v.status for v in store.list()}


# --- commit, read, layout ------------------------------------------------------------------


def test_commit_get_load_and_the_directory_layout(store, tmp_path):
    v1 = store.commit(ckpt(1), round=1, now=10.0,
                      metrics={"accuracy": np.float32(0.5), "examples": np.int64(70)})
    v2 = store.commit(ckpt(2, 2.0), round=2, metrics={}, parent=1, now=20.0)
    assert (v1.id, v2.id, v2.parent, v2.round, v2.created) == (1, 2, 1, 2, 20.0)
    assert v1.status == "candidate" and dict(v1.metrics) == {"accuracy": 0.5, "examples": 70}
    assert type(v1.metrics["examples"]) is int  # numpy scalars are stored as Python numbers
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        ".lock", "index.json", "v000001.npz", "v000002.npz"]
    # the recorded SHA-256 is that of the file's bytes
    assert v2.sha256 == hashlib.sha256((tmp_path / "models" / "v000002.npz").read_bytes()
                                       ).hexdigest()
    assert v2.path == tmp_path / "models" / "v000002.npz"
    back = store.load(2)
    np.testing.assert_array_equal(back.state.params, np.arange(6, dtype=np.float32) * 2)
    assert back.state.version == 2 and back.seed == 3 and back.meta == {"run": "t"}
    assert store.get(1) == v1 and store.list() == [v1, v2]
    index = json.loads((tmp_path / "models" / "index.json").read_text())
    assert index["format"] == "shoal-models/1" and index["production"] is None
    assert [e["file"] for e in index["versions"]] == ["v000001.npz", "v000002.npz"]
    assert v2.to_dict() == {"id": 2, "parent": 1, "round": 2, "created": 20.0, "metrics": {},
                            "status": "candidate", "sha256": v2.sha256, "file": "v000002.npz",
                            "rounds": [2, 2], "config_hash": None, "plan": None}


def test_versions_survive_reopening_and_readers_see_new_commits(tmp_path):
    with ModelStore(tmp_path) as s:
        fill(s, 3)
        s.promote(2, now=5.0)
        before = s.list()
    reader = ModelStore(tmp_path, readonly=True)
    assert reader.list() == before and reader.production().id == 2
    with ModelStore(tmp_path) as s:
        assert s.list() == before
        s.commit(ckpt(4), round=4, metrics={}, now=6.0)
        assert [v.id for v in reader.list()] == [1, 2, 3, 4]  # reader re-reads the index


def test_latest_production_and_lineage(store):
    assert store.latest() is None and store.production() is None
    fill(store, 4)
    store.commit(ckpt(9), round=9, metrics={}, parent=2, now=2000.0)  # a branch from v2
    assert store.latest().id == 5
    assert store.latest("production") is None
    store.promote(3, now=1.0)
    assert store.latest("production").id == 3 == store.production().id
    assert store.latest("candidate").id == 5
    assert [v.id for v in store.lineage(5)] == [5, 2, 1]
    assert [v.id for v in store.lineage(4)] == [4, 3, 2, 1]
    with pytest.raises(ConfigError, match="status must be one of"):
        store.latest("live")


# --- promotion and rollback ----------------------------------------------------------------


def test_promote_keeps_one_production_version(store):
    fill(store, 3)
    assert store.promote(1, now=50.0).status == "production"
    store.promote(3, now=60.0)
    assert statuses(store) == {1: "candidate", 2: "candidate", 3: "production"}
    store.promote(3, now=70.0)  # already production: nothing changes, nothing logged
    assert [(e.action, e.version, e.previous, e.at) for e in store.history()] == [
        ("promote", 1, None, 50.0), ("promote", 3, 1, 60.0)]


def test_commit_straight_to_production(store):
    fill(store, 1)
    store.promote(1, now=1.0)
    v = store.commit(ckpt(2), round=2, metrics={}, parent=1, status="production", now=2.0)
    assert v.status == "production" and statuses(store) == {1: "candidate", 2: "production"}
    assert store.history()[-1].previous == 1


def test_rollback_marks_the_bad_version_and_restores_a_good_one(store):
    fill(store, 4)
    store.promote(2, now=1.0)
    store.promote(4, now=2.0)
    assert store.rollback(2, now=3.0).status == "production"
    assert statuses(store) == {1: "candidate", 2: "production", 3: "candidate",
                               4: "rolled_back"}
    assert store.history()[-1] == ModelEvent(at=3.0, action="rollback", version=2,
                                             previous=4)
    with pytest.raises(ModelStoreError, match="version 4 was rolled back and cannot be promoted"):
        store.promote(4, now=4.0)
    with pytest.raises(ModelStoreError, match="version 4 was itself rolled back"):
        store.rollback(4, now=4.0)


@pytest.mark.parametrize("target, error, message", [
    (9, UnknownVersion, r"no model version 9 \(versions: 1..3\)"),
    (3, ModelStoreError, "version 3 is the current production version"),
    ("2", ConfigError, "version must be an int"),
])
def test_refused_rollbacks_change_nothing(store, tmp_path, target, error, message):
    fill(store, 3)
    store.promote(3, now=1.0)
    index = (tmp_path / "models" / "index.json").read_bytes()
    with pytest.raises(error, match=message):
        store.rollback(target, now=2.0)
    assert (tmp_path / "models" / "index.json").read_bytes() == index
    assert store.production().id == 3


def test_rollback_needs_a_production_version(store):
    fill(store, 2)
    with pytest.raises(ModelStoreError, match="no production version to roll back from"):
        store.rollback(1, now=1.0)


# --- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, key", [
    ({"round": -1}, "round"),
    ({"round": True}, "round"),
    ({"metrics": {"loss": float("nan")}}, "metrics.loss"),
    ({"metrics": {"ok": "high"}}, "metrics.ok"),
    ({"status": "rolled_back"}, "status"),
    ({"now": float("inf")}, "now"),
])
def test_invalid_commits_write_nothing(store, tmp_path, kwargs, key):
    args = {"round": 1, "metrics": {}, "now": 1.0, **kwargs}
    with pytest.raises(ConfigError) as exc:
        store.commit(ckpt(), **args)
    assert exc.value.key == key
    assert store.list() == []
    assert not list((tmp_path / "models").glob("*.npz"))


def test_unknown_parent_is_refused(store, tmp_path):
    with pytest.raises(UnknownVersion, match="no model version 7"):
        store.commit(ckpt(), round=1, metrics={}, parent=7, now=1.0)
    with pytest.raises(ConfigError, match="checkpoint must be"):
        store.commit(np.zeros(3), round=1, metrics={}, now=1.0)
    assert not list((tmp_path / "models").glob("*.npz"))


# --- crashes and damage --------------------------------------------------------------------


def test_failed_index_write_leaves_the_store_as_it_was(store, tmp_path, monkeypatch):
    fill(store, 2)

    def boom(self, index):
        raise OSError("disk full")

    monkeypatch.setattr(ModelStore, "_write", boom)
    with pytest.raises(OSError, match="disk full"):
        store.commit(ckpt(3), round=3, metrics={}, now=3.0)
    monkeypatch.undo()
    assert [v.id for v in store.list()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "models").glob("*.npz")) == [
        "v000001.npz", "v000002.npz"]
    assert store.commit(ckpt(3), round=3, metrics={}, now=4.0).id == 3


def test_hard_crash_between_model_file_and_index(tmp_path):
    with ModelStore(tmp_path) as s:
        fill(s, 2)
    # A real process dies (os._exit: no cleanup, no finally) after the model file is on disk
    # and before the index is rewritten.
    script = textwrap.dedent(f"""
        import os, numpy as np
        from shoal.params import ParamSpec
        from shoal.store import Checkpoint, Store
        from shoal.store.models import ModelStore
        from shoal.strategy import ServerState
        ModelStore._write = lambda self, index: os._exit(17)
        s = ModelStore({str(tmp_path)!r})
        ck = Checkpoint(ServerState(np.ones(6, np.float32), version=3),
                        ParamSpec.from_shapes({{"w": (2, 3)}}), seed=3)
        s.commit(ck, round=3, metrics={{}}, now=3.0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == 17, proc.stderr.decode()
    models = tmp_path / "models"
    assert (models / "v000003.npz").exists()  # the orphan the crash left
    (models / ".v000004.npz.abc.tmp").write_bytes(b"half")  # and a torn temporary file
    reader = ModelStore(tmp_path, readonly=True)
    assert [v.id for v in reader.list()] == [1, 2]  # readers ignore the orphan
    with ModelStore(tmp_path) as s:  # the lock died with the process
        assert s.recovered == (".v000004.npz.abc.tmp", "v000003.npz")
        assert [v.id for v in s.list()] == [1, 2]
        assert not (models / "v000003.npz").exists()
        v3 = s.commit(ckpt(3, 3.0), round=3, metrics={}, now=5.0)
        assert v3.id == 3
        np.testing.assert_array_equal(s.load(3).state.params, np.arange(6) * 3.0)


def test_index_pointing_at_a_missing_or_corrupt_file_is_reported(store, tmp_path):
    fill(store, 3)
    models = tmp_path / "models"
    (models / "v000002.npz").unlink()
    raw = bytearray((models / "v000003.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (models / "v000003.npz").write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"v000002\.npz \(version 2\) is missing") as exc:
        store.load(2)
    assert exc.value.path == str(models / "v000002.npz")
    with pytest.raises(DataError, match=r"v000003\.npz \(version 3\) is corrupt: SHA-256"):
        store.load(3)
    assert sorted(store.verify()) == [2, 3]
    # production never points at a damaged model
    with pytest.raises(DataError, match="is missing"):
        store.promote(2, now=1.0)
    assert store.production() is None
    assert store.load(1).state.version == 1  # the intact version still loads


def test_missing_or_damaged_index_is_refused(tmp_path):
    with ModelStore(tmp_path) as s:
        fill(s, 2)
    index = tmp_path / "models" / "index.json"
    good = index.read_bytes()
    index.unlink()
    with pytest.raises(DataError, match="index.json is missing but 2 model files exist"):
        ModelStore(tmp_path)
    index.write_text("{not json")
    with pytest.raises(DataError, match="index.json is unreadable"):
        ModelStore(tmp_path, readonly=True)
    doc = json.loads(good)
    doc["production"] = 1  # pointer without a version marked production
    index.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="production pointer 1 disagrees"):
        ModelStore(tmp_path)
    index.write_bytes(good)
    assert [v.id for v in ModelStore(tmp_path, readonly=True).list()] == [1, 2]


# --- several writers ------------------------------------------------------------------------


def test_writers_share_a_store_while_readers_only_read(tmp_path):
    first, second = ModelStore(tmp_path), ModelStore(tmp_path)
    fill(first, 1)
    # each change starts from the index the other left: ids continue, nothing is lost
    assert second.commit(ckpt(2), round=2, metrics={}, parent=1, now=2.0).id == 2
    assert first.commit(ckpt(3), round=3, metrics={}, parent=2, now=3.0).id == 3
    assert [v.id for v in first.list()] == [v.id for v in second.list()] == [1, 2, 3]
    second.promote(3, now=4.0)
    assert first.production().id == 3  # a query sees the other writer's change at once
    reader = ModelStore(tmp_path, readonly=True)
    assert [v.id for v in reader.list()] == [1, 2, 3]
    with pytest.raises(ModelStoreError, match="read-only"):
        reader.commit(ckpt(), round=2, metrics={}, now=1.0)
    with pytest.raises(ModelStoreError, match="read-only"):
        reader.promote(1, now=1.0)
    first.close()
    with pytest.raises(ModelStoreError, match="read-only"):
        first.commit(ckpt(), round=2, metrics={}, now=1.0)
    assert first.get(3).status == "production"  # a closed writer still answers queries
    second.close()


def test_production_pointer_moves_by_compare_and_set(store):
    fill(store, 3)
    with pytest.raises(PointerMoved, match="at None, not 1") as exc:
        store.promote(2, now=1.0, expected=1)
    assert (exc.value.expected, exc.value.actual) == (1, None)
    store.promote(1, now=2.0, expected=None)
    store.promote(2, now=3.0, expected=1)
    before = (statuses(store), store.history())
    with pytest.raises(PointerMoved, match="at 2, not 1"):
        store.promote(3, now=4.0, expected=1)  # a stale read: someone promoted 2 since
    with pytest.raises(PointerMoved, match="at 2, not 3"):
        store.rollback(1, now=4.0, expected=3)
    assert (statuses(store), store.history()) == before  # a refused swap changes nothing
    store.rollback(1, now=5.0, expected=2)
    assert statuses(store) == {1: "production", 2: "rolled_back", 3: "candidate"}


def test_a_writer_stuck_holding_the_lock_is_reported(store, tmp_path):
    fill(store, 1)
    fd = os.open(tmp_path / "models" / ".lock", os.O_RDWR)  # another open file: another
    fcntl.flock(fd, fcntl.LOCK_EX)                          # writer's lock
    try:
        slow = ModelStore(tmp_path, readonly=True)
        with pytest.raises(StoreLocked, match=r"stayed locked by another writer \(pid "
                                              rf"{os.getpid()}\) for 0.2 s") as exc:
            ModelStore(tmp_path, lock_timeout=0.2)
        assert exc.value.pid == os.getpid()
        assert [v.id for v in slow.list()] == [1]  # queries take no lock
    finally:
        os.close(fd)
    assert store.commit(ckpt(2), round=2, metrics={}, now=2.0).id == 2


_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from shoal.params import ParamSpec
    from shoal.store import Checkpoint, ModelStore
    from shoal.store.model_versions import PointerMoved
    from shoal.strategy import ServerState

    root, me, n, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    store = ModelStore(root)
    while time.time() < start:  # both writers begin together
        time.sleep(0.001)
    for i in range(n):
        params = np.full(6, 1000 * me + i, np.float32)
        ck = Checkpoint(ServerState(params, version=i), ParamSpec.from_shapes({"w": (2, 3)}),
                        seed=me)
        v = store.commit(ck, round=i, metrics={"writer": me, "i": i}, now=time.time())
        while True:  # promote it unless a newer version is production: compare-and-set
            current = store.production()
            if current is not None and current.id > v.id:
                break
            try:
                store.promote(v.id, now=time.time(), reason=f"writer {me}",
                              expected=None if current is None else current.id)
                break
            except PointerMoved:
                continue
    store.close()
""")


def test_two_processes_commit_and_promote_concurrently(tmp_path):
    n = 25
    start = time.time() + 1.5  # time for both interpreters to start
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path), str(me), str(n),
                               str(start)], stderr=subprocess.PIPE) for me in (1, 2)]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    store = ModelStore(tmp_path, readonly=True)
    versions = store.list()
    assert [v.id for v in versions] == list(range(1, 2 * n + 1))  # none lost, none reused
    assert store.verify() == {}
    for v in versions:  # every version holds what its writer committed, whole
        me, i = int(v.metrics["writer"]), int(v.metrics["i"])
        ck = store.load(v.id)
        np.testing.assert_array_equal(ck.state.params, np.full(6, 1000 * me + i, np.float32))
        assert (ck.seed, ck.state.version) == (me, i)
    for me in (1, 2):  # each writer's commits in its own order
        mine = [int(v.metrics["i"]) for v in versions if v.metrics["writer"] == me]
        assert mine == list(range(n))
    # every pointer move started from where the previous one left it (no lost update), and
    # production only ever moved forward, ending at the newest version
    events = store.history()
    assert [e.previous for e in events] == [None] + [e.version for e in events[:-1]]
    assert all(a.version < b.version for a, b in zip(events, events[1:]))
    assert store.production().id == 2 * n
    assert len(ModelStore(tmp_path).recovered) == 0


def test_readonly_store_must_exist(tmp_path):
    with pytest.raises(DataError, match="no model store at"):
        ModelStore(tmp_path / "nowhere", readonly=True)


def test_public_api(store):
    assert isinstance(store, Store) and not isinstance(object(), Store)
    for mod in (models_mod, versions_mod, index_mod):
        assert all(hasattr(mod, name) for name in mod.__all__)
    for cls in (ModelStoreError, StoreLocked, UnknownVersion, PointerMoved):
        assert issubclass(cls, ShoalError)
    assert issubclass(UnknownVersion, LookupError)
