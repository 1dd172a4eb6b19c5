"""mlot-kernels: fused kernels for cross-tokenizer knowledge distillation with MultiLevelOT.

Importing the package registers the ``torch.ops.mlot`` operators.
"""

from mlot_kernels import reference
from mlot_kernels.sinkhorn import SinkhornLoss, sinkhorn_loss

__all__ = ["SinkhornLoss", "reference", "sinkhorn_loss"]
