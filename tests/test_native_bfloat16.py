"""core.native_bfloat16: which devices multiply bfloat16 matrices in hardware."""

from __future__ import annotations

import pytest
import torch

from transformer_patcher.core.native_bfloat16 import native_bfloat16


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"), [(True, False, True), (False, True, True), (False, False, False)]
)
def test_a_cpu_is_native_with_avx512_bf16_or_amx(avx512_bf16: bool, amx: bool, expected: bool, monkeypatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert native_bfloat16(torch.device("cpu")) is expected


def test_a_cpu_without_the_probes_is_not_native(monkeypatch) -> None:
    """torch's CPU probes are private: a torch without them answers "no" rather than failing."""
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert native_bfloat16(torch.device("cpu")) is False


def test_cuda_asks_torch_without_emulation(monkeypatch) -> None:
    asked: list[bool] = []

    def supported(including_emulation: bool = True) -> bool:
        asked.append(including_emulation)
        return True

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    assert native_bfloat16(torch.device("cuda", 0)) is True
    assert asked == [False]
    assert native_bfloat16(torch.device("meta")) is False
