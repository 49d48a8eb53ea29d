"""Small tensors made once per device, so that a training step makes no tensor from Python data.

On a GPU a tensor made from Python data (torch.tensor, an index given as a list) is a host-to-device copy that
waits for every kernel queued before it: a host sync. The index and weight tensors of the nested losses and
of the Matryoshka sum are therefore made on their first use and shared afterwards
(tests/test_nested.py counts the tensors a second step makes: none).
"""

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """torch.tensor(values, dtype=dtype) on `device`, made once per (values, device, dtype) and shared: never
    modify it. (The dtype is part of the key, since (1, 2) and (1.0, 2.0) are equal keys.)"""
    with torch.inference_mode(False):  # a first call under inference mode must not cache an inference tensor
        return torch.tensor(values, device=device, dtype=dtype)
