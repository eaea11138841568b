from __future__ import annotations

import numpy as np
import pytest

from shoal.errors import DataError
from shoal.params import ParamSpec
from shoal.store import Checkpoint, load_checkpoint, save_checkpoint
from shoal.strategy import FedAdam


def _ckpt():
    s = FedAdam(server_lr=0.1)
    state = s.init(np.arange(6, dtype=np.float32))
    state = s.apply(state, np.ones(6))
    return Checkpoint(state=state, spec=ParamSpec.from_shapes({"w": (2, 3)}), seed=5,
                      meta={"note": "x"})


def test_a_checkpoint_written_before_versions_were_named_still_loads(tmp_path):
    """Checkpoints of wave 1 stored the version under the key 'round'."""
    import io
    import json

    ck = _ckpt()
    arrays = {("round" if k == "version" else k): v for k, v in ck.state.to_arrays().items()}
    from shoal.store.checkpoint import _FORMAT, _digest

    header = {"format": _FORMAT, "spec": ck.spec.to_dict(), "seed": 5, "round": 1,
              "sha256": _digest(arrays), "meta": {}}
    buf = io.BytesIO()
    np.savez(buf, __header__=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
             **arrays)
    (tmp_path / "old.npz").write_bytes(buf.getvalue())
    back = load_checkpoint(tmp_path / "old.npz")
    assert back.state.version == 1
    np.testing.assert_array_equal(back.state.params, ck.state.params)


def test_round_trip_keeps_everything_needed_to_resume(tmp_path):
    ck = _ckpt()
    save_checkpoint(tmp_path / "m.npz", ck)
    back = load_checkpoint(tmp_path / "m.npz")
    assert back.state.version == 1 and back.seed == 5 and back.spec == ck.spec
    assert back.meta == {"note": "x"}
    np.testing.assert_array_equal(back.state.params, ck.state.params)
    assert set(back.state.slots) == {"m", "v"}
    for k in ck.state.slots:
        np.testing.assert_array_equal(back.state.slots[k], ck.state.slots[k])


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    save_checkpoint(tmp_path / "m.npz", _ckpt())
    save_checkpoint(tmp_path / "m.npz", _ckpt())
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]


def test_corruption_and_garbage_are_detected(tmp_path):
    p = tmp_path / "m.npz"
    save_checkpoint(p, _ckpt())
    raw = bytearray(p.read_bytes())
    # flip a byte inside the stored params (npz members are stored uncompressed)
    pos = raw.find(np.arange(6, dtype=np.float32)[3:].tobytes())
    if pos < 0:  # params moved after the update; corrupt the middle of the file instead
        pos = len(raw) // 2
    raw[pos] ^= 0xFF
    p.write_bytes(bytes(raw))
    with pytest.raises(DataError):
        load_checkpoint(p)
    (tmp_path / "g.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="unreadable"):
        load_checkpoint(tmp_path / "g.npz")
    with pytest.raises(DataError, match="does not exist"):
        load_checkpoint(tmp_path / "none.npz")
