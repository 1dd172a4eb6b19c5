"""The device's measured ceilings, and the fraction of them a step reaches.

- memory bandwidth: a large device-to-device copy, ``dst.copy_(src)``, counted as reading and
  writing the buffer: ``2 * bytes / time``;
- arithmetic rate: a large float32 matrix product (TF32 off on CUDA), ``2 n^3 / time``.

A step's fraction is its modelled work (the cases modules' ``work(case)``: the bytes it must
move, the floating-point operations it must do) over its median time, divided by the ceiling.
"""

import torch

from benchmarks.steps import synchronizer
from benchmarks.timing import median_seconds

SIZES = {  # device type: (copy MiB, matmul n)
    "cuda": (1024, 8192),
    "cpu": (256, 2048),
}
QUICK_SIZES = (16, 256)


def measure(device, quick=False):
    """{"copy_gb_s", "matmul_fp32_tflop_s"} of ``device``, with the sizes used."""
    device = torch.device(device)
    sync = synchronizer(device)
    copy_mib, n = QUICK_SIZES if quick else SIZES[device.type]
    src = torch.empty(copy_mib * 2**20 // 4, device=device).uniform_()
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        sync()

    copy_s, _ = median_seconds(copy, target_s=1.0, min_rounds=5)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        def matmul():
            torch.mm(a, b)
            sync()

        mm_s, _ = median_seconds(matmul, target_s=1.0, min_rounds=3)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return dict(copy_gb_s=2 * copy_mib * 2**20 / copy_s / 1e9, copy_mib=copy_mib,
                matmul_fp32_tflop_s=2 * n**3 / mm_s / 1e12, matmul_n=n)


def fractions(work, seconds, ceilings):
    """{"bandwidth_fraction", "arithmetic_fraction"} of a step doing ``work`` in ``seconds``
    (None where the work model has no such figure)."""
    flops, nbytes = work.get("flops"), work.get("bytes")
    return dict(
        bandwidth_fraction=None if nbytes is None else nbytes / seconds / 1e9 / ceilings["copy_gb_s"],
        arithmetic_fraction=(None if flops is None
                             else flops / seconds / 1e12 / ceilings["matmul_fp32_tflop_s"]),
    )
