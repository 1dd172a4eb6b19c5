"""mlot-kernels: fused kernels for cross-tokenizer knowledge distillation with MultiLevelOT.

Importing the package registers the ``torch.ops.mlot`` operators: their CPU kernels (C++) and,
where Triton is installed, their CUDA kernels (:mod:`mlot_kernels.triton_ops`,
:mod:`mlot_kernels.triton_topk`).
"""

import importlib.util

from mlot_kernels import reference
from mlot_kernels.multi_level_ot import MultiLevelOTLoss, multi_level_ot_loss
from mlot_kernels.sinkhorn import SinkhornLoss, sinkhorn_loss
from mlot_kernels.topk_probs import topk_probs
from mlot_kernels.uld import uld_loss, uld_loss_from_hidden

if importlib.util.find_spec("triton") is not None:
    from mlot_kernels import triton_ops, triton_topk  # noqa: F401  (register the CUDA kernels)

__all__ = ["MultiLevelOTLoss", "SinkhornLoss", "multi_level_ot_loss", "reference", "sinkhorn_loss",
           "topk_probs", "uld_loss", "uld_loss_from_hidden"]
