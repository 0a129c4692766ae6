"""Linear layers with weights prepacked for oneDNN, for CPU inference.

`F.linear` on CPU calls a general GEMM that re-reads the weight in a layout made for large
batches; decode runs 1-32 rows per step, where a weight reordered once into oneDNN's blocked
layout runs about 2x faster (benchmarks/engine.py shows the effect end to end). Packing is an
optimisation only: where the oneDNN ops are missing the model keeps plain `nn.Linear`.
"""

from __future__ import annotations

import torch
from torch import nn


def packing_available() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class PackedLinear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Replace every nn.Linear in `model` by a PackedLinear; returns how many were packed."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, PackedLinear(child.weight, child.bias))
            count += 1
        else:
            count += pack_linears(child)
    return count
