"""Device placement: patches live on the device where the FFN they extend actually runs.

Under an accelerate ``device_map`` with CPU or disk offload, a module's weights sit on ``meta`` and an
``AlignDevicesHook`` moves them to its execution device for each forward. Patches are small and must never be
offloaded, so they are created directly on that execution device.
"""

from __future__ import annotations

import torch
from accelerate.hooks import SequentialHook
from torch import nn

_META = torch.device("meta")


def _hooks(module: nn.Module) -> list[object]:
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(hook.hooks) if isinstance(hook, SequentialHook) else [hook]


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate execution device, else its first non-meta tensor's."""
    for hook in _hooks(module):
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    for tensor in list(module.parameters()) + list(module.buffers()):
        if tensor.device != _META:
            return tensor.device
    return torch.device("cpu")
