r"""The ULD baseline (Boizard et al., 2024): Universal Logit Distillation.

With the answer rows of both models found as in :mod:`mlot_kernels.multi_level_ot` and
``n = min(n_S, n_T)``, each row's full probability vector sorted descending (``token`` ranking,
the smaller vocabulary zero-padded to the larger):

.. math::

    \mathrm{ULD}_b = \frac1n \sum_{i<n} \sum_l \big|\mathrm{sort}(p^S_i)_l - \mathrm{sort}(p^T_i)_l\big|

averaged over the batch; ``distill = weight * ULD`` and ``loss = ce + distill``.
"""

import torch

from mlot_kernels.answers import causal_lm_cross_entropy
from mlot_kernels.multi_level_ot import aligned_mean, answer_batch, kernel_ops


def uld_loss(student_logits, teacher_logits, student_labels, teacher_labels, *, weight=1.5,
             temperature=1.0, answer_span="labels", skip_student_eos=False, kernels="fused"):
    """The ULD loss of a batch: a dict with ``loss`` (= ce + distill), ``ce``, ``distill`` and
    the unweighted ``uld``; arguments as for :func:`mlot_kernels.multi_level_ot_loss`."""
    truncate = kernel_ops(kernels, "uld_loss")[0]
    student, teacher, s_len, t_len = answer_batch(student_logits, teacher_logits, student_labels,
                                                  teacher_labels, answer_span, skip_student_eos)
    width = max(student.shape[-1], teacher.shape[-1])  # the whole sorted vocabulary
    s_sorted = truncate(student, s_len, width, temperature, False, "token")[0]
    t_sorted = truncate(teacher, t_len, width, temperature, False, "token")[0]
    uld = aligned_mean((s_sorted - t_sorted).abs().sum(-1), torch.minimum(s_len, t_len)).mean()
    ce = causal_lm_cross_entropy(student_logits, student_labels)
    return dict(loss=ce + weight * uld, ce=ce, distill=weight * uld, uld=uld)
