r"""The MultiLevelOT distillation loss (Cui et al., AAAI 2025), ``paper`` and ``official`` presets.

For each sequence ``b`` let ``t^k`` [n_T, k] and ``s^k`` [n_S, k] be the teacher's and the
student's top-k probabilities at the logits that predict answer tokens, left-aligned
(:func:`mlot_kernels.topk_probs`: softmax at ``temperature``, optional std scaling, columns
ordered by ``ranking``), and ``n = min(n_T, n_S)``. Preset ``paper`` (the default):

.. math::

    \mathrm{HAD}_b = \frac1n \sum_{i<n} \sum_l |t^k_{il} - s^k_{il}|, \qquad
    \mathrm{SL}_b = -\frac1n \sum_{i<n} \sum_l t^k_{il} \log s^k_{il}, \qquad
    \mathrm{SD}_b = \langle P, C \rangle

where SD is :func:`mlot_kernels.sinkhorn_loss` (L1 cost, ``epsilon``, ``n_iters``, unit
marginals) between the top-k vectors taken again at ``sd_temperature`` over the valid rows. Each
term is averaged over the batch and ``distill = alpha * (HAD + beta * SL + gamma * SD)``.

Preset ``official`` is what the released code computes (``../shared/docs/method.md``): std
scaling, ``batch`` ranking, the ``window`` answer rule with the student's EOS position dropped,
``SL = -mean over all B*L rows of sum_l softmax(s^k)_l log_softmax(t^k)_l`` (``sl_form=
"official"``; zero rows past a sequence's length included), ``SD_b`` over all L rows with the
softmax at ``sd_temperature`` taken over the truncated vectors (``sd_softmax="truncated"``), 10
iterations, ``SD = sum_b 0.001 SD_b``, and ``distill = 1.5 * (HAD + 0.1 SL + 0.1 SD)``.

``loss = ce + distill`` with ``ce`` the student's token-mean cross-entropy on its labels, as
Hugging Face computes it (:func:`mlot_kernels.losses.answers.causal_lm_cross_entropy`).

Each model's logits are read once per pass, and only at the rows that carry a label or a term:
one op per model (:func:`mlot_kernels.ops.topk_probs.answer_topk_probs`) gives its truncations at
both temperatures and the student's cross-entropy, and writes its gradient in one buffer. In place
of a model's logits the loss also takes :class:`mlot_kernels.losses.outputs.Hidden` (its last hidden
state and output layer), whose logits it never builds (:mod:`mlot_kernels.ops.linear_topk_probs`).
Sequences without answer tokens add 0
to every term (and ``n = 0`` gives ``HAD_b = SL_b = 0``); in ``SL_b``, ``log s`` is taken as
``log max(s, tiny)`` (tiny: the smallest normal number of the dtype), so a student vocabulary
smaller than ``k`` gives a large finite SL rather than infinity.
"""

import dataclasses
import math
import numbers
from typing import NamedTuple, Optional

import torch

from mlot_kernels.losses import outputs
from mlot_kernels.losses.answers import (SPAN_RULES, answer_positions, batch_mean, ce_targets, pad_rows,
                                  token_mean)
from mlot_kernels.losses.outputs import Hidden, kernel_ops


@dataclasses.dataclass(frozen=True)
class Options:
    """Every constant of the method; the defaults are the ``paper`` preset."""

    k: int = 50                      # columns kept per probability vector
    temperature: float = 1.0         # token-level softmax temperature (tau)
    std_scale: bool = False          # z <- z / (std(z) + 1e-4) per logit row first
    ranking: str = "sequence"        # column order: 'token', 'sequence' or 'batch'
    answer_span: str = "labels"      # answer rule: 'labels' or 'window' (mlot_kernels.losses.answers)
    skip_student_eos: bool = False   # drop the student's last answer position
    had: bool = True                 # compute HAD
    sl: bool = True                  # compute SL
    sd: bool = True                  # compute SD
    sl_form: str = "paper"           # 'paper': -sum t log s; 'official': softmax/log_softmax form
    sd_softmax: str = "vocabulary"   # 'vocabulary': top-k of softmax(z / sd_temperature);
    #                                  'truncated': softmax(t^k / sd_temperature) of the top-k
    sd_temperature: float = 2.0
    sd_padded_rows: bool = False     # SD over all L rows (zero rows past the lengths included)
    epsilon: float = 0.1
    n_iters: int = 20
    unit_marginals: bool = True
    detach_plan: bool = False
    sd_scale: float = 1.0            # SD = sd_scale * reduce_b SD_b
    sd_reduction: str = "mean"       # 'mean' or 'sum' over the batch
    alpha: float = 0.15              # distill = alpha * (HAD + beta * SL + gamma * SD)
    beta: float = 0.1
    gamma: float = 0.1

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, checked_option(field.name, getattr(self, field.name),
                                                                field.type))
        for name, low, ok in (("k", ">= 1", self.k >= 1), ("n_iters", ">= 0", self.n_iters >= 0),
                              ("temperature", "> 0", self.temperature > 0),
                              ("sd_temperature", "> 0", self.sd_temperature > 0),
                              ("epsilon", "> 0", self.epsilon > 0)):
            if not ok:
                raise ValueError(f"multi_level_ot_loss: {name} must be {low}, got "
                                 f"{getattr(self, name)!r}")
        choices = dict(ranking=("token", "sequence", "batch"), answer_span=SPAN_RULES,
                       sl_form=("paper", "official"), sd_softmax=("vocabulary", "truncated"),
                       sd_reduction=("mean", "sum"))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"multi_level_ot_loss: {name} must be one of {allowed}, "
                                 f"got {getattr(self, name)!r}")


def checked_option(name, value, kind, caller="multi_level_ot_loss"):
    """``value`` as an option of type ``kind`` (int, float, bool or str; an int is a float, a bool
    is not a number), or a TypeError naming the option, the type and what was given."""
    if kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = {int: "an int", float: "a finite float", bool: "a bool", str: "a str"}[kind]
        raise TypeError(f"{caller}: {name} must be {expected}, got {value!r} "
                        f"({type(value).__name__})")
    return kind(value)


PRESETS = {
    "paper": Options(),
    "official": Options(std_scale=True, ranking="batch", answer_span="window",
                        skip_student_eos=True, sl_form="official", sd_softmax="truncated",
                        sd_padded_rows=True, n_iters=10, sd_scale=0.001, sd_reduction="sum",
                        alpha=1.5),
}

def resolve_options(preset="paper", **overrides):
    """The preset's Options with the overrides applied; clear errors for unknown names."""
    if preset not in PRESETS:
        raise ValueError(f"multi_level_ot_loss: preset must be one of {tuple(PRESETS)}, got {preset!r}")
    names = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"multi_level_ot_loss: unknown option(s) {unknown}; the options are "
                        f"{sorted(names)}")
    return dataclasses.replace(PRESETS[preset], **overrides)


class Truncated(NamedTuple):
    """One model's answer rows after truncation: everything the loss takes from that model but
    its cross-entropy. The teacher's is what ``mlot-distill --teacher-cache`` stores."""

    probs: torch.Tensor               # [B, A, k]: top-k probabilities at ``temperature``
    sd_probs: Optional[torch.Tensor]  # [B, A, k] at ``sd_temperature`` (SD from the vocabulary)
    lengths: torch.Tensor             # [B]: answer lengths
    indices: torch.Tensor             # the columns kept: [k], [B, k] or [B, A, k] by ranking


def temperatures(opts):
    """The softmax temperatures the truncation takes: ``temperature``, and ``sd_temperature``
    when SD takes its own top-k of the vocabulary."""
    if opts.sd and opts.sd_softmax == "vocabulary":
        return (opts.temperature, opts.sd_temperature)
    return (opts.temperature,)


def truncate_answers(source, labels, opts, kernels, model, drop_last=False, with_ce=False):
    """One model's answer rows (left-aligned) truncated by ``opts`` and, ``with_ce``, its
    token-mean cross-entropy on ``labels``, in one op that reads no other row of its logits
    (``source``: the logits, or :class:`mlot_kernels.losses.outputs.Hidden`; ``model`` names it in
    errors): (:class:`Truncated`, ce or None)."""
    outputs.check(source, labels, model)
    positions, lengths = answer_positions(labels, opts.answer_span, drop_last=drop_last)
    targets = ce_targets(labels) if with_ce else None
    temps = temperatures(opts)
    probs, indices, ce = outputs.answer_probs(kernels, source, positions, lengths, targets, opts.k,
                                              temps, opts.std_scale, opts.ranking)
    sd_probs = probs[1] if len(temps) == 2 else None
    truncated = Truncated(probs[0], sd_probs, lengths, indices[0])
    return truncated, token_mean(ce, targets) if with_ce else None


def check_batch_sizes(student, teacher, names=("student_logits", "teacher_logits")):
    """A ValueError naming both tensors when their first dimensions (batch sizes) differ
    (either may be :class:`mlot_kernels.losses.outputs.Hidden`)."""
    student, teacher = (x.states if isinstance(x, Hidden) else x for x in (student, teacher))
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {names[0]} "
                         f"{tuple(student.shape)}, {names[1]} {tuple(teacher.shape)}")


def aligned_mean(values, n):
    """[B]: mean over the first n_b rows of values [B, L] (0 where n_b = 0)."""
    valid = torch.arange(values.shape[1], device=values.device)[None, :] < n[:, None]
    return torch.where(valid, values, 0).sum(1) / n.clamp(min=1)


def distill_terms(student, teacher, opts, transport):
    """The terms HAD, SL, SD switched on in ``opts`` and ``distill``, from both models'
    :class:`Truncated` answers, each padded with zero rows to the longer of the two."""
    length = max(student.probs.shape[1], teacher.probs.shape[1])
    s_k, t_k = pad_rows(student.probs, length), pad_rows(teacher.probs, length)
    n = torch.minimum(student.lengths, teacher.lengths)
    out = {}
    distill = s_k.new_zeros(())
    if opts.had:
        out["had"] = batch_mean(aligned_mean((t_k - s_k).abs().sum(-1), n))
        distill = distill + out["had"]
    if opts.sl:
        if opts.sl_form == "paper":
            log_s = s_k.clamp(min=torch.finfo(s_k.dtype).tiny).log()
            out["sl"] = batch_mean(aligned_mean(-(t_k * log_s).sum(-1), n))
        else:
            rows = (torch.softmax(s_k, -1) * torch.log_softmax(t_k, -1)).sum(-1)
            out["sl"] = -rows.sum() / max(rows.numel(), 1)
        distill = distill + opts.beta * out["sl"]
    if opts.sd:
        if opts.sd_softmax == "vocabulary":
            x, y = pad_rows(teacher.sd_probs, length), pad_rows(student.sd_probs, length)
            sd_temperature = 0.0
        else:
            x, y, sd_temperature = t_k, s_k, opts.sd_temperature
        lengths = (None, None) if opts.sd_padded_rows else (teacher.lengths, student.lengths)
        per_sequence = transport(x, y, *lengths, opts.epsilon, opts.n_iters, sd_temperature, 1,
                                 opts.unit_marginals, opts.detach_plan)
        reduced = batch_mean(per_sequence) if opts.sd_reduction == "mean" else per_sequence.sum()
        out["sd"] = opts.sd_scale * reduced
        distill = distill + opts.gamma * out["sd"]
    out["distill"] = opts.alpha * distill
    return out


def multi_level_ot_loss(student_logits, teacher_logits, student_labels, teacher_labels, *,
                        preset="paper", kernels="fused", **overrides):
    """The MultiLevelOT loss of a batch: a dict with ``loss`` (= ce + distill), ``ce``,
    ``distill`` and the unweighted terms ``had``, ``sl``, ``sd`` that are switched on.

    Args:
        student_logits: [B, T_S, V_S]; teacher_logits: [B, T_T, V_T] (any vocabulary sizes);
            either may be a :class:`mlot_kernels.losses.outputs.Hidden` instead.
        student_labels: [B, T_S]; teacher_labels: [B, T_T] integer, -100 = ignored; the logit
            at position i predicts the label at i + 1.
        preset: 'paper' or 'official'.
        kernels: 'fused' (torch.ops.mlot) or 'reference' (mlot_kernels.ops.reference).
        **overrides: any field of :class:`Options`.

    The math is in this module's docstring.
    """
    loss_fn = MultiLevelOTLoss(preset, kernels, **overrides)
    return loss_fn(student_logits, teacher_logits, student_labels, teacher_labels)


class MultiLevelOTLoss(torch.nn.Module):
    """Module form of :func:`multi_level_ot_loss`; the options are resolved (and checked) here.

    ``loss_fn(student_logits, teacher_logits, student_labels, teacher_labels)`` equals
    ``loss_fn.from_targets(student_logits, student_labels, loss_fn.teacher_targets(teacher_logits,
    teacher_labels))``: the teacher's side can be computed once and stored (unless the ranking
    is ``batch``, whose column order depends on the whole batch).

    The ``*_hidden`` methods take a model's last hidden state after its final norm [B, T, H],
    its output embedding ``weight`` [V, H] and ``bias`` [V] (or None) in place of its logits,
    and give the same results as on the logits ``hidden @ weight.T + bias`` without building
    them (:mod:`mlot_kernels.ops.linear_topk_probs`); gradients reach hidden, weight and bias.
    """

    def __init__(self, preset="paper", kernels="fused", **overrides):
        super().__init__()
        self.options = resolve_options(preset, **overrides)
        self.ops = kernel_ops(kernels, "MultiLevelOTLoss")
        self.kernels = kernels

    def teacher_targets(self, teacher_logits, teacher_labels):
        """The teacher's :class:`Truncated` answers."""
        return truncate_answers(teacher_logits, teacher_labels, self.options, self.ops,
                                "teacher")[0]

    def teacher_targets_from_hidden(self, teacher_hidden, teacher_weight, teacher_labels,
                                    teacher_bias=None):
        """The teacher's :class:`Truncated` answers from its hidden states."""
        return self.teacher_targets(Hidden(teacher_hidden, teacher_weight, teacher_bias),
                                    teacher_labels)

    def from_targets(self, student_logits, student_labels, targets):
        """The loss dict from the student's logits and labels and the teacher's targets."""
        student, ce = truncate_answers(student_logits, student_labels, self.options, self.ops,
                                       "student", drop_last=self.options.skip_student_eos,
                                       with_ce=True)
        check_batch_sizes(student.probs, targets.probs, ("student probs", "teacher targets probs"))
        out = dict(ce=ce)
        out.update(distill_terms(student, targets, self.options, self.ops.sinkhorn_loss))
        out["loss"] = out["ce"] + out["distill"]
        return out

    def from_hidden_targets(self, student_hidden, student_weight, student_labels, targets, *,
                            student_bias=None):
        """:meth:`from_targets` from the student's hidden states."""
        return self.from_targets(Hidden(student_hidden, student_weight, student_bias),
                                 student_labels, targets)

    def from_hidden(self, student_hidden, student_weight, student_labels, teacher_hidden,
                    teacher_weight, teacher_labels, *, student_bias=None, teacher_bias=None):
        """The loss dict of :meth:`forward` from both models' hidden states."""
        return self(Hidden(student_hidden, student_weight, student_bias),
                    Hidden(teacher_hidden, teacher_weight, teacher_bias), student_labels,
                    teacher_labels)

    def forward(self, student_logits, teacher_logits, student_labels, teacher_labels):
        check_batch_sizes(student_logits, teacher_logits,
                          (outputs.names("student", student_logits)[0],
                           outputs.names("teacher", teacher_logits)[0]))
        return self.from_targets(student_logits, student_labels,
                                 self.teacher_targets(teacher_logits, teacher_labels))

    def extra_repr(self) -> str:
        return f"{self.options}, kernels={self.kernels!r}"
