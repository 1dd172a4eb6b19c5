"""mlot-kernels: fused kernels for cross-tokenizer knowledge distillation with MultiLevelOT.

Importing the package registers the ``torch.ops.mlot`` operators: their CPU kernels (C++) and,
where Triton is installed, their CUDA kernels (:mod:`mlot_kernels.triton_ops`).
"""

import importlib.util

from mlot_kernels import reference
from mlot_kernels.sinkhorn import SinkhornLoss, sinkhorn_loss
from mlot_kernels.topk_probs import topk_probs

if importlib.util.find_spec("triton") is not None:
    from mlot_kernels import triton_ops  # noqa: F401  (registers the CUDA kernels)

__all__ = ["SinkhornLoss", "reference", "sinkhorn_loss", "topk_probs"]
