"""mlot-kernels: fused kernels for cross-tokenizer knowledge distillation with MultiLevelOT.

Importing the package registers the ``torch.ops.mlot`` operators: their CPU kernels (C++) and,
where Triton is installed, their CUDA kernels (:mod:`mlot_kernels.ops.sinkhorn_triton`,
:mod:`mlot_kernels.ops.topk_probs_triton`).
"""

import importlib.util

from mlot_kernels.losses.multi_level_ot import MultiLevelOTLoss, multi_level_ot_loss
from mlot_kernels.losses.uld import uld_loss, uld_loss_from_hidden
from mlot_kernels.ops import reference
from mlot_kernels.ops.sinkhorn import SinkhornLoss, sinkhorn_loss
from mlot_kernels.ops.topk_probs import topk_probs

if importlib.util.find_spec("triton") is not None:
    # register the CUDA kernels
    from mlot_kernels.ops import sinkhorn_triton, topk_probs_triton  # noqa: F401

__all__ = ["MultiLevelOTLoss", "SinkhornLoss", "multi_level_ot_loss", "reference", "sinkhorn_loss",
           "topk_probs", "uld_loss", "uld_loss_from_hidden"]
