"""A model's outputs as the losses read them: its logits [B, T, V], or its last hidden state with
its output layer (:class:`Hidden`), whose logits ``hidden @ weight.T + bias`` are never built;
and the ops that read each (:data:`KERNELS`: the fused ones, or the plain PyTorch references)."""

from typing import Callable, NamedTuple, Optional

import torch

from mlot_kernels.ops import reference
from mlot_kernels.losses.answers import ce_targets, check_pair, token_mean
from mlot_kernels.ops.linear_topk_probs import linear_topk_probs
from mlot_kernels.ops.linear_uld_distance import linear_uld_distance
from mlot_kernels.ops.row_chunks import check_linear
from mlot_kernels.ops.sinkhorn import sinkhorn_loss
from mlot_kernels.ops.topk_probs import answer_topk_probs
from mlot_kernels.ops.uld_distance import uld_distance


class Hidden(NamedTuple):
    """A model's logits as ``states @ weight.T + bias``: its last hidden state after the final
    norm [B, T, H] and its output embedding [V, H] (and bias [V])."""

    states: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None


class Kernels(NamedTuple):
    """The ops a loss runs on (their arguments: mlot_kernels.ops.topk_probs.answer_topk_probs,
    mlot_kernels.ops.uld_distance.uld_distance and their hidden-state forms)."""

    answer_topk_probs: Callable
    linear_topk_probs: Callable
    sinkhorn_loss: Callable
    uld_distance: Callable
    linear_uld_distance: Callable


KERNELS = {
    "fused": Kernels(answer_topk_probs, linear_topk_probs, sinkhorn_loss, uld_distance,
                     linear_uld_distance),
    "reference": Kernels(reference.answer_topk_probs, reference.linear_topk_probs,
                         reference.sinkhorn_loss, reference.uld_distance,
                         reference.linear_uld_distance),
}


def kernel_ops(kernels, caller):
    """The :class:`Kernels` named ``kernels``, or a ValueError naming ``caller``."""
    if kernels not in KERNELS:
        raise ValueError(f"{caller}: kernels must be one of {tuple(KERNELS)}, got {kernels!r}")
    return KERNELS[kernels]


def names(model, source):
    """The argument names of one model's outputs and labels in errors ('student', a source)."""
    if isinstance(source, Hidden):
        return f"{model}_hidden", f"{model}_weight", f"{model}_bias", f"{model}_labels"
    return f"{model}_logits", f"{model}_labels"


def check(source, labels, model):
    """One model's outputs (logits, or :class:`Hidden`) and labels [B, T], or a ValueError
    naming the argument."""
    arg_names = names(model, source)
    if isinstance(source, Hidden):
        check_linear(source.states, source.weight, source.bias, arg_names[:3])
        check_pair(source.states, labels, arg_names[0], arg_names[3])
    else:
        check_pair(source, labels, *arg_names)


def batch_size(source):
    return (source.states if isinstance(source, Hidden) else source).shape[0]


def answer_probs(kernels, source, rows, lengths, targets, k, temperatures, std_scale, ranking):
    """answer_topk_probs of one model's outputs: (probs, indices, ce)."""
    if isinstance(source, Hidden):
        return kernels.linear_topk_probs(source.states, source.weight, source.bias, rows,
                                         lengths, targets, k, temperatures, std_scale, ranking)
    return kernels.answer_topk_probs(source, rows, lengths, targets, k, temperatures, std_scale,
                                     ranking)


def uld_rows(kernels, student, student_rows, student_targets, teacher, teacher_rows, lengths,
             temperature):
    """uld_distance of both models' outputs: both logits, both :class:`Hidden`, or one of each
    (then the Hidden one's logits are built: a teacher cache's few answer rows)."""
    if isinstance(student, Hidden) != isinstance(teacher, Hidden):
        student, teacher = (torch.nn.functional.linear(*x) if isinstance(x, Hidden) else x
                            for x in (student, teacher))
    if isinstance(student, Hidden):
        return kernels.linear_uld_distance(*student, student_rows, student_targets, *teacher,
                                           teacher_rows, lengths, temperature)
    return kernels.uld_distance(student, student_rows, student_targets, teacher, teacher_rows,
                                lengths, temperature)


def cross_entropy(source, labels, kernels="fused"):
    """The causal-LM token-mean cross-entropy of one model's outputs (logits or :class:`Hidden`)
    on ``labels`` (Hugging Face's; 0 without labels), reading only the labelled rows."""
    ops = kernel_ops(kernels, "cross_entropy")
    check(source, labels, "student")
    targets = ce_targets(labels)
    batch = batch_size(source)
    no_rows = labels.new_zeros(batch, 0, dtype=torch.int64)
    no_lengths = labels.new_zeros(batch, dtype=torch.int64)
    _, _, ce = answer_probs(ops, source, no_rows, no_lengths, targets, 1, (1.0,), False, "token")
    return token_mean(ce, targets)
