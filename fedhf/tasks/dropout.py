"""Dropout for training on the CPU with a cheaper random mask.

torch draws a CPU dropout mask (``bernoulli_``) at about 6 ns per element on one thread: on the quickstart's
batches that is over a quarter of a training step, more than the attention. :class:`CpuDropout` is the same
operation, each element kept with probability ``1 - p`` and scaled by ``1 / (1 - p)``, with the mask drawn from
numpy's SFC64 generator (about 1 ns per element, 32-bit thresholds: the keep probability is exact to 2^-32).
Each call seeds its own generator from one draw of torch's default CPU generator, so the masks follow
``torch.manual_seed`` like torch's own and no state is shared between calls or threads. On other devices, in
eval mode, for p = 0 or p = 1, and for tensors that are not floating point it is ``nn.Dropout``.

:func:`use_cpu_dropout` swaps it in for every ``nn.Dropout`` module of a model (the encoder's hidden and
embedding dropout, PEFT's ``lora_dropout``, a classifier head's). Dropout inside ``scaled_dot_product_attention``
(attention probabilities) is torch's and unchanged. Only the masks' random stream differs from torch's: the
distribution, the scaling and the gradient are the same.
"""

from __future__ import annotations

import numpy as np
import torch

_SPAN = 2**32
_SEED_HIGH = 2**63 - 1


def cpu_dropout(x: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """``F.dropout(x, p, training=True, inplace=inplace)``, its mask from numpy for a CPU float tensor and
    0 < p < 1 (see the module's doc); torch's own otherwise."""
    keep = 1.0 - p
    threshold = round(keep * _SPAN)
    if not 0.0 < p < 1.0 or threshold >= _SPAN or x.device.type != "cpu" or not x.is_floating_point():
        return torch.nn.functional.dropout(x, p, training=True, inplace=inplace)
    seed = int(torch.randint(_SEED_HIGH, (), dtype=torch.int64))  # torch's RNG decides, as for its own dropout
    n = x.numel()
    raw = np.random.SFC64(seed).random_raw((n + 1) // 2).view(np.uint32)[:n]
    noise = torch.from_numpy((raw < threshold).astype(np.float32)).view(x.shape).to(x.dtype).div_(keep)
    return x.mul_(noise) if inplace else x * noise


class CpuDropout(torch.nn.Dropout):
    """``nn.Dropout`` with :func:`cpu_dropout` for CPU training; otherwise ``nn.Dropout`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_dropout(x, self.p, self.inplace) if self.training else x


def use_cpu_dropout(model: torch.nn.Module) -> int:
    """Replace every ``nn.Dropout`` module of ``model`` (exactly that class) by a :class:`CpuDropout` with the same
    ``p`` and ``inplace``; returns how many were replaced."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is torch.nn.Dropout
    ]
    for parent, name, child in swaps:
        fast = CpuDropout(child.p, child.inplace)
        fast.train(child.training)
        setattr(parent, name, fast)
    return len(swaps)
