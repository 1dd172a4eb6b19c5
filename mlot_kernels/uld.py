r"""The ULD baseline (Boizard et al., 2024): Universal Logit Distillation.

With the answer rows of both models found as in :mod:`mlot_kernels.multi_level_ot` and
``n = min(n_S, n_T)``, each row's full probability vector sorted descending (the smaller
vocabulary zero-padded to the larger):

.. math::

    \mathrm{ULD}_b = \frac1n \sum_{i<n} \sum_l \big|\mathrm{sort}(p^S_i)_l - \mathrm{sort}(p^T_i)_l\big|

averaged over the batch; ``distill = weight * ULD`` and ``loss = ce + distill``. The distance
and the student's cross-entropy come from one op, :func:`mlot_kernels.uld_distance.uld_distance`,
that reads only the paired rows and the labelled ones.
"""

import torch

from mlot_kernels.answers import (answer_positions, batch_mean, ce_targets, check_pair,
                                  token_mean)
from mlot_kernels.multi_level_ot import (STUDENT_NAMES, TEACHER_NAMES, aligned_mean,
                                         check_batch_sizes, kernel_ops)


def uld_loss(student_logits, teacher_logits, student_labels, teacher_labels, *, weight=1.5,
             temperature=1.0, answer_span="labels", skip_student_eos=False, kernels="fused"):
    """The ULD loss of a batch: a dict with ``loss`` (= ce + distill), ``ce``, ``distill`` and
    the unweighted ``uld``; arguments as for :func:`mlot_kernels.multi_level_ot_loss`."""
    ops = kernel_ops(kernels, "uld_loss")
    check_pair(student_logits, student_labels, *STUDENT_NAMES)
    check_pair(teacher_logits, teacher_labels, *TEACHER_NAMES)
    check_batch_sizes(student_logits, teacher_logits)
    s_pos, s_len = answer_positions(student_labels, answer_span, drop_last=skip_student_eos)
    t_pos, t_len = answer_positions(teacher_labels, answer_span)
    n = torch.minimum(s_len, t_len)
    pairs = min(s_pos.shape[1], t_pos.shape[1])  # at least max(n)
    targets = ce_targets(student_labels)
    distance, ce_rows = ops.uld_distance(student_logits, s_pos[:, :pairs], targets, teacher_logits,
                                         t_pos[:, :pairs], n, temperature)
    uld = batch_mean(aligned_mean(distance, n))
    ce = token_mean(ce_rows, targets)
    return dict(loss=ce + weight * uld, ce=ce, distill=weight * uld, uld=uld)
