from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.errors import SpecError
from shoal.frameworks.torch import FlatModule, spec_of
from shoal.models import build_model
from shoal.params import ParamSpec, flatten, unflatten

shapes = st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(shapes=shapes, seed=st.integers(0, 2**32 - 1))
def test_flatten_unflatten_round_trip(shapes, seed):
    spec = ParamSpec.from_shapes([(f"t{i}", s) for i, s in enumerate(shapes)])
    rng = np.random.default_rng(seed)
    arrays = {t.name: rng.normal(size=t.shape).astype(np.float32) for t in spec.tensors}
    vec = flatten(arrays, spec)
    assert vec.shape == (sum(int(np.prod(s)) for s in shapes),)
    back = unflatten(vec, spec)
    for name, a in arrays.items():
        np.testing.assert_array_equal(back[name], a)
    # offsets tile the vector with no gaps or overlaps
    assert [t.offset for t in spec.tensors] == list(np.cumsum([0] + [t.size for t in
                                                                      spec.tensors])[:-1])


def test_unflatten_returns_views_that_write_through():
    spec = ParamSpec.from_shapes({"w": (2, 3), "b": (3,)})
    vec = np.zeros(spec.size, dtype=np.float32)
    views = unflatten(vec, spec)
    views["b"][1] = 7.0
    assert vec[spec["b"].offset + 1] == 7.0


def test_spec_errors_name_the_problem():
    spec = ParamSpec.from_shapes({"w": (2, 3), "b": (3,)})
    with pytest.raises(SpecError, match="missing \\['b'\\]"):
        flatten({"w": np.zeros((2, 3))}, spec)
    with pytest.raises(SpecError, match="unexpected \\['c'\\]"):
        flatten({"w": np.zeros((2, 3)), "b": np.zeros(3), "c": np.zeros(1)}, spec)
    with pytest.raises(SpecError, match="shape \\(3, 2\\)"):
        flatten({"w": np.zeros((3, 2)), "b": np.zeros(3)}, spec)
    with pytest.raises(SpecError, match="8 elements, the spec needs 9"):
        unflatten(np.zeros(8, np.float32), spec)
    with pytest.raises(SpecError, match="duplicate"):
        ParamSpec.from_shapes([("a", (1,)), ("a", (2,))])
    with pytest.raises(SpecError, match=r"no tensor named 'c' in the spec; it has \['w', 'b'\]"):
        spec["c"]


def test_spec_serialises_and_fingerprints():
    spec = ParamSpec.from_shapes({"w": (2, 3), "b": (3,)})
    assert ParamSpec.from_dict(spec.to_dict()) == spec
    other = ParamSpec.from_shapes({"w": (3, 2), "b": (3,)})
    assert spec.fingerprint != other.fingerprint
    assert len(spec.fingerprint) == 16


@pytest.mark.parametrize("name, size", [("mlp2nn", 199_210), ("logreg", 7_850),
                                        ("cnn", 44_426)])
def test_reference_models_have_the_published_sizes(name, size):
    assert spec_of(build_model(name, 784, 10, seed=0)).size == size


def test_flat_module_binds_parameters_to_one_buffer():
    model = build_model("mlp2nn", 784, 10, seed=0)
    before = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy()
    fm = FlatModule(model)
    np.testing.assert_array_equal(fm.get(), before)  # rebinding keeps the values
    new = np.arange(fm.spec.size, dtype=np.float32)
    fm.set(new)
    np.testing.assert_array_equal(model[1].weight.detach().numpy().reshape(-1),
                                  new[:784 * 200])
    # the module computes with the loaded parameters
    x = torch.randn(3, 784)
    ref = build_model("mlp2nn", 784, 10, seed=0)
    FlatModule(ref).set(new)
    torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(SpecError):
        fm.set(np.zeros(5, np.float32))


def test_same_seed_same_initialisation():
    a = FlatModule(build_model("cnn", 784, 10, seed=3)).get()
    b = FlatModule(build_model("cnn", 784, 10, seed=3)).get()
    c = FlatModule(build_model("cnn", 784, 10, seed=4)).get()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
