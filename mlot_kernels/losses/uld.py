r"""The ULD baseline (Boizard et al., 2024): Universal Logit Distillation.

With the answer rows of both models found as in :mod:`mlot_kernels.losses.multi_level_ot` and
``n = min(n_S, n_T)``, each row's full probability vector sorted descending (the smaller
vocabulary zero-padded to the larger):

.. math::

    \mathrm{ULD}_b = \frac1n \sum_{i<n} \sum_l \big|\mathrm{sort}(p^S_i)_l - \mathrm{sort}(p^T_i)_l\big|

averaged over the batch; ``distill = weight * ULD`` and ``loss = ce + distill``. The distance
and the student's cross-entropy come from one op, :func:`mlot_kernels.ops.uld_distance.uld_distance`,
that reads only the paired rows and the labelled ones.
"""

import torch

from mlot_kernels.losses import outputs
from mlot_kernels.losses.answers import answer_positions, batch_mean, ce_targets, token_mean
from mlot_kernels.losses.multi_level_ot import aligned_mean, check_batch_sizes, checked_option
from mlot_kernels.losses.outputs import Hidden, kernel_ops


def uld_loss(student_logits, teacher_logits, student_labels, teacher_labels, *, weight=1.5,
             temperature=1.0, answer_span="labels", skip_student_eos=False, kernels="fused"):
    """The ULD loss of a batch: a dict with ``loss`` (= ce + distill), ``ce``, ``distill`` and
    the unweighted ``uld``; arguments as for :func:`mlot_kernels.multi_level_ot_loss` (logits, or
    :class:`mlot_kernels.losses.outputs.Hidden`)."""
    ops = kernel_ops(kernels, "uld_loss")
    weight = checked_option("weight", weight, float, "uld_loss")
    temperature = checked_option("temperature", temperature, float, "uld_loss")
    skip_student_eos = checked_option("skip_student_eos", skip_student_eos, bool, "uld_loss")
    if not temperature > 0:
        raise ValueError(f"uld_loss: temperature must be > 0, got {temperature!r}")
    outputs.check(student_logits, student_labels, "student")
    outputs.check(teacher_logits, teacher_labels, "teacher")
    check_batch_sizes(student_logits, teacher_logits,
                      (outputs.names("student", student_logits)[0],
                       outputs.names("teacher", teacher_logits)[0]))
    s_pos, s_len = answer_positions(student_labels, answer_span, drop_last=skip_student_eos)
    t_pos, t_len = answer_positions(teacher_labels, answer_span)
    n = torch.minimum(s_len, t_len)
    pairs = min(s_pos.shape[1], t_pos.shape[1])  # at least max(n)
    targets = ce_targets(student_labels)
    distance, ce_rows = outputs.uld_rows(ops, student_logits, s_pos[:, :pairs], targets,
                                         teacher_logits, t_pos[:, :pairs], n, temperature)
    uld = batch_mean(aligned_mean(distance, n))
    ce = token_mean(ce_rows, targets)
    return dict(loss=ce + weight * uld, ce=ce, distill=weight * uld, uld=uld)


def uld_loss_from_hidden(student_hidden, student_weight, student_labels, teacher_hidden,
                         teacher_weight, teacher_labels, *, student_bias=None, teacher_bias=None,
                         **options):
    """:func:`uld_loss` from both models' last hidden states after their final norms [B, T, H],
    output embeddings ``*_weight`` [V, H] and biases [V] (or None): the same dict as on the
    logits ``hidden @ weight.T + bias``, without building them
    (:mod:`mlot_kernels.ops.linear_uld_distance`); ``options`` as for :func:`uld_loss`."""
    return uld_loss(Hidden(student_hidden, student_weight, student_bias),
                    Hidden(teacher_hidden, teacher_weight, teacher_bias), student_labels,
                    teacher_labels, **options)
