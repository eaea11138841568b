"""Fuzzing the codec wire format and its decoders (updates and model downloads): any bytes
give a valid vector or a CodecError -- never another exception, a hang or an allocation
beyond the bound (see tests/fuzz_targets.py)."""

from __future__ import annotations

import pytest
from hypothesis import given

import fuzz_targets as ft

SETTINGS = ft.fuzz_settings()


@SETTINGS
@given(ft.mutated_payloads())
def test_update_payloads(data):
    ft.wire_update(data)


@SETTINGS
@given(ft.mutated_payloads())
def test_download_payloads(data):
    ft.wire_download(data)


@pytest.mark.parametrize("seed", range(len(ft.seeds())))
def test_the_seeds_decode(seed):
    """The fuzzers start from payloads that decode (else they would only test refusals)."""
    from shoal.codec import download_from_bytes, from_bytes

    data = ft.seeds()[seed]
    try:
        assert from_bytes(data, max_elements=ft.DIM).size == ft.DIM
    except Exception:
        assert download_from_bytes(data, max_elements=ft.DIM).version == 2
