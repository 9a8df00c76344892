"""Dense bf16 tensor-core peak FLOP/s of known GPUs: the denominator of MFU.

Vendor figures without sparsity (datasheets quote "with sparsity" = 2x these). Matched by
substring of torch.cuda.get_device_name(), most specific first (e.g. "H100 PCIe" before "H100",
"L40S" before "L40" before "L4").

Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM 1,979 / NVL 1,671 / PCIe 1,513 TFLOPS bf16 with
sparsity), NVIDIA H200 datasheet (SXM 1,979 / NVL 1,671 with sparsity), NVIDIA A100 datasheet
(312 dense), NVIDIA L4 datasheet (242 with sparsity), NVIDIA L40S / L40 datasheets (733 / 362 with
sparsity), NVIDIA A10 datasheet (250 with sparsity), NVIDIA Ada Lovelace architecture whitepaper
(RTX 4090: 165.2 dense bf16 with fp32 accumulate, 330.4 with sparsity).
"""
from __future__ import annotations

from typing import Optional

GPU_BF16_PEAK_FLOPS: list[tuple[str, float]] = [
    ("H200 NVL", 835e12),
    ("H200", 989e12),        # SXM
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),        # SXM (also "H100 80GB HBM3")
    ("A100", 312e12),        # SXM and PCIe
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("A10", 125e12),
]


def bf16_peak_flops(device_name: str) -> Optional[float]:
    """Dense bf16 peak of the GPU called `device_name`, or None when it is not in the table."""
    return next((flops for key, flops in GPU_BF16_PEAK_FLOPS if key in device_name), None)
