"""The loss of each distillation method on a micro-batch, with the teacher's side: its forward
(after the prompt prefix it shares, :mod:`mlot_kernels.distill.prefix_cache`) or its cached
hidden states (:mod:`mlot_kernels.distill.teacher_cache`). Shared by the reference loop
(:mod:`mlot_kernels.distill.trainer`) and the Hugging Face trainer
(:mod:`mlot_kernels.integrations.transformers`).

- ``sft`` and ``seqkd``: the student's cross-entropy on its labels (the data's answers, or the
  teacher's greedy ones);
- ``uld``: :func:`mlot_kernels.uld_loss`;
- ``mlot``: :class:`mlot_kernels.MultiLevelOTLoss` (``loss_options``: ``preset`` and any of its
  options).
"""

import torch

from mlot_kernels.distill.models import HiddenStates
from mlot_kernels.distill.teacher_cache import TeacherCache
from mlot_kernels.losses.multi_level_ot import MultiLevelOTLoss
from mlot_kernels.losses.outputs import Hidden, cross_entropy
from mlot_kernels.losses.uld import uld_loss

METHODS = ("sft", "seqkd", "uld", "mlot")
TEACHER_METHODS = ("uld", "mlot")  # the methods that read the teacher at training time
LOSS_FROM = ("hidden", "logits")  # what the losses read: hidden states and output layers


def hidden(states, weight, bias=None):
    """:class:`Hidden` of a model's last hidden state and output layer, the states in the
    layer's dtype (under autocast they may come in another)."""
    return Hidden(states.to(weight.dtype), weight, bias)


class Method:
    """``terms(indices, student, labels, teacher_batch)``: the dict of loss terms of ``method``
    (``loss`` first) on a micro-batch, from the student's outputs (its logits, or
    :class:`mlot_kernels.losses.outputs.Hidden`) and labels, the micro-batch's example indices
    (the teacher cache's keys) and the teacher's batch (``input_ids``, ``attention_mask``,
    ``labels``).

    ``teacher_head`` is the teacher's output layer (weight, bias) when the losses read its
    hidden states, ``prefix`` its :class:`mlot_kernels.distill.prefix_cache.PrefixCache`, and
    ``cache_dir`` a :class:`mlot_kernels.distill.teacher_cache.TeacherCache` directory for
    ``cache_fingerprint`` (needs ``teacher_head``).
    """

    def __init__(self, method, teacher=None, *, loss_options=None, kernels="fused",
                 teacher_head=None, prefix=None, cache_dir="", cache_fingerprint=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if loss_options and method != "mlot":
            raise ValueError(f"loss_options are options of method 'mlot', got method {method!r}")
        if method in TEACHER_METHODS and teacher is None:
            raise ValueError(f"method {method!r} needs a teacher")
        if cache_dir and (method not in TEACHER_METHODS or teacher_head is None):
            raise ValueError(f"a teacher cache is for methods {TEACHER_METHODS} reading the "
                             f"teacher's hidden states, got method {method!r}")
        self.method, self.kernels = method, kernels
        self.teacher, self.teacher_head, self.prefix = teacher, teacher_head, prefix
        self.loss_fn = MultiLevelOTLoss(kernels=kernels, **(loss_options or {})) \
            if method == "mlot" else None
        self.cache = None
        if cache_dir:
            answer_span = self.loss_fn.options.answer_span if self.loss_fn else "labels"
            self.cache = TeacherCache(cache_dir, cache_fingerprint, answer_span)
        self.teacher_forwards = 0

    def teacher_forward(self, batch, hidden_states):
        """(the teacher's last hidden state (``hidden_states``) or logits, labels) on a batch,
        without gradients; when every sequence starts with the ``prefix``, on the sequences
        after it, the labels cut alike."""
        self.teacher_forwards += 1
        ids = batch["input_ids"]
        shared = self.prefix.length if self.prefix and self.prefix.starts(ids) else 0
        inputs = dict(input_ids=ids[:, shared:], attention_mask=batch["attention_mask"])
        if shared:
            inputs |= self.prefix.expand(ids.shape[0])
        with torch.no_grad():
            if hidden_states:
                out = HiddenStates(self.teacher)(**inputs)
            else:
                out = self.teacher(**inputs).logits
        return out, batch["labels"][:, shared:]

    def teacher_outputs(self, indices, batch):
        """(outputs, labels) of the teacher for the loss: its hidden states from the cache (filled
        on a miss, then read back, so that every epoch sees the same states) or from its
        forward, or its logits."""
        if self.cache:
            stored = self.cache.get(indices, batch["labels"].device)
            if stored is None:
                self.cache.put(indices, *self.teacher_forward(batch, True))
                stored = self.cache.get(indices, batch["labels"].device)
            return hidden(stored[0], *self.teacher_head), stored[1]
        if self.teacher_head is not None:
            states, labels = self.teacher_forward(batch, True)
            return hidden(states, *self.teacher_head), labels
        return self.teacher_forward(batch, False)

    def terms(self, indices, student, labels, teacher_batch):
        if self.method in ("sft", "seqkd"):
            ce = cross_entropy(student, labels, self.kernels)
            return dict(loss=ce, ce=ce)
        teacher, teacher_labels = self.teacher_outputs(indices, teacher_batch)
        if self.method == "uld":
            return uld_loss(student, teacher, labels, teacher_labels, kernels=self.kernels)
        return self.loss_fn(student, teacher, labels, teacher_labels)
