"""Prepacked linear layers for CPU inference (oneDNN).

`pack_for_inference(model)` swaps every plain `nn.Linear` of a GPT for a `PackedLinear` whose weight
oneDNN has reordered once into its own blocked layout, and gives each attention layer one fused
q/k/v projection. On this kind of CPU that does two things for serving:

  - speed: measured on the demo model's shapes, a product of 4-16 rows takes about half the time of
    the default (MKL) path, 1 row about the same, and one fused q/k/v product replaces three
    (bench/serve.py measures the whole server);
  - row invariance: a row's output is bitwise the same whatever the number of rows it is computed
    with (MKL switches to a matrix-vector kernel below 4 rows, with other rounding). The serving
    scheduler then computes exactly the rows in use each decode step (nanochat/serve/scheduler.py
    checks this at start-up and falls back to tiles of rows where it does not hold).

The model's parameters stay where they were (`state_dict()` is unchanged); the packed copies are
snapshots, so a packed model is for inference only: a forward with gradients enabled is refused.
Only fp32 models on a CPU with oneDNN are packed; anything else is left as it is (returns 0).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

# oneDNN picks its blocked layout from this row-count hint; a hint of 1 picks a matrix-vector layout
# whose rounding differs from the one used for more rows, so a larger hint is needed for invariance
_PACK_HINT = 16


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `pack_for_inference` would pack a model on this device and dtype."""
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and all(hasattr(torch.ops.mkldnn, op) for op in ("_linear_pointwise", "_reorder_linear_weight")))


class PackedLinear(nn.Module):
    """y = x @ Wᵀ on a weight prepacked by oneDNN (no bias; every Linear in the GPT is bias-free).

    `weight` is the original parameter, kept for device/dtype/state_dict; `packed` is the snapshot
    the forward uses (a non-persistent buffer)."""

    def __init__(self, weight: torch.Tensor, keep: Optional[nn.Parameter] = None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        if keep is not None:
            self.weight = keep
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _PACK_HINT)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("PackedLinear is for inference only (its packed weight does not follow "
                               "updates); train the model before nanochat.packed.pack_for_inference")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed"


def pack_for_inference(model: nn.Module) -> int:
    """Pack `model`'s Linear layers in place (see the module docstring); returns how many layers now run
    packed (0 when packing does not apply here, or the model is already packed)."""
    ref = next(model.parameters(), None)
    if ref is None or getattr(model, "packed_for_inference", False) or not packing_available(ref.device, ref.dtype):
        return 0
    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and child.bias is None:
                    setattr(parent, name, PackedLinear(child.weight, keep=child.weight))
                    count += 1
            if hasattr(parent, "c_qkv") and isinstance(parent.c_q, PackedLinear):
                # one product for q, k and v (the unfused layers stay for state_dict, unused)
                parent.c_qkv = PackedLinear(torch.cat([parent.c_q.weight, parent.c_k.weight, parent.c_v.weight]))
                count += 1
    model.packed_for_inference = True
    return count
