"""Whether a device multiplies bfloat16 matrices in hardware, so that bfloat16 steps beat float32 ones.

A CPU without AVX-512 BF16 or AMX has its bfloat16 products emulated (oneDNN widens them to float32), and so has a
CUDA device before Ampere: there bfloat16 saves memory but no time. ``torch.cuda.is_bf16_supported`` answers for CUDA;
for the CPU torch's own probes are private (``torch.cpu._is_avx512_bf16_supported``), so each is read with a
fallback of "no".
"""

from __future__ import annotations

import torch

_CPU_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def native_bfloat16(device: torch.device) -> bool:
    """True where ``device`` has bfloat16 matrix units: a CUDA device that supports bfloat16 without emulation, or a
    CPU with AVX-512 BF16 or AMX."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    if device.type == "cpu":
        return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in _CPU_PROBES)
    return False
