"""Answer positions of causal-LM batches in the Hugging Face convention, and the student's
cross-entropy.

Labels are -100 on prompt and padding, and the logit at position i predicts the label at
i + 1. The distillation losses compare the logits that predict answer tokens, left-aligned
(row 0 = the logit that predicts the first answer token). Two rules find them:

- ``"labels"``: every position i with ``labels[i + 1] != -100``, in order (any label pattern);
- ``"window"`` (the released MultiLevelOT code): ``shift`` = the number of leading -100 labels
  minus 1, ``size`` = the number of labels that are not -100, rows ``[shift, shift + size)``.

For one contiguous answer after the prompt the two agree.
"""

import torch

IGNORE_INDEX = -100
SPAN_RULES = ("labels", "window")


def check_pair(logits, labels, logits_name, labels_name):
    """logits [B, T, V] and labels [B, T] of one model, or a ValueError naming the argument."""
    if logits.dim() != 3:
        raise ValueError(f"{logits_name} must be a 3-D tensor [B, T, V], got shape {tuple(logits.shape)}")
    if labels.dim() != 2 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{labels_name} must have shape [B, T] = {tuple(logits.shape[:2])} like "
                         f"{logits_name}, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"{labels_name} must have an integer dtype, got {labels.dtype}")


def answer_positions(labels, rule, drop_last=False):
    """(positions [B, A], lengths [B]): the logit positions that predict answer tokens,
    left-aligned; positions past a sequence's length are clamped copies (never used).

    ``drop_last`` drops each sequence's last answer position (the one that predicts EOS).
    """
    batch, steps = labels.shape
    answer = labels != IGNORE_INDEX
    if rule == "labels":
        predicts = answer[:, 1:]  # position i predicts label i + 1
        index = torch.arange(steps - 1, device=labels.device)
        # answer positions first, in order, then the rest: a stable sort on (not answer, i)
        order = torch.where(predicts, index, index + steps).argsort(dim=1, stable=True)
        lengths = predicts.sum(1)
        positions = order
    elif rule == "window":
        lengths = answer.sum(1)
        leading = torch.where(answer.any(1), answer.int().argmax(1), steps)
        start = leading - 1
        if ((lengths > 0) & ((start < 0) | (start + lengths > steps))).any():
            raise ValueError(
                "answer_span='window' needs every answer to start after position 0 and its "
                "window [leading - 1, leading - 1 + size) to lie inside the sequence; got labels "
                "whose first label is not -100 or whose labels are not one contiguous answer "
                "(use answer_span='labels')")
        positions = start.clamp(min=0)[:, None] + torch.arange(steps, device=labels.device)
    else:
        raise ValueError(f"answer_span must be one of {SPAN_RULES}, got {rule!r}")
    if drop_last:
        lengths = (lengths - 1).clamp(min=0)
    width = int(lengths.max()) if batch else 0
    return positions[:, :width].clamp(max=steps - 1), lengths


def answer_rows(logits, positions):
    """logits[b, positions[b, i]]: the answer rows, left-aligned, [B, A, V]."""
    batch = torch.arange(logits.shape[0], device=logits.device)[:, None]
    return logits[batch, positions]


def pad_rows(rows, length):
    """rows [B, A, V] padded with zero rows (or cut) to [B, length, V]."""
    return torch.nn.functional.pad(rows, (0, 0, 0, length - rows.shape[1]))


def ce_targets(labels):
    """[B, T]: the label each logit row predicts, ``labels[:, i + 1]`` (-100 for the last row):
    the ``targets`` of :func:`mlot_kernels.ops.topk_probs.answer_topk_probs`."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_mean(ce_rows, targets):
    """The token-mean cross-entropy from per-row losses ``ce_rows`` [B, T] and their ``targets``
    (Hugging Face's mean over the labels that are not -100; 0 when there are none)."""
    return ce_rows.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)


def batch_mean(values):
    """The mean of ``values`` [B] over the batch; 0 (with a gradient of 0) for B = 0."""
    return values.sum() / max(values.shape[0], 1)


def causal_lm_cross_entropy(logits, labels):
    """The token-mean cross-entropy of logits[:, i] against labels[:, i + 1] over the labels that
    are not -100, in at least float32, as Hugging Face computes it; 0 when there are none."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    targets = labels[:, 1:].reshape(-1)
    total = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).to(dtype),
                                              targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)
