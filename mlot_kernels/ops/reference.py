"""Plain PyTorch references of the ops: the ground truth of the tests.

Each follows its contract (docs in the op's module) literally, one problem at a time, with
autograd through every step. Pass float64 inputs for a float64 evaluation.
"""

import itertools
import math

import torch


def sinkhorn_loss(x, y, x_lengths=None, y_lengths=None, epsilon=0.1, n_iters=20,
                  temperature=0.0, p=1, unit_marginals=False, detach_plan=False):
    """Reference of ``torch.ops.mlot.sinkhorn_loss``: log-domain Sinkhorn, [B] losses."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    losses = []
    for xb, yb in valid_prefixes(x, y, x_lengths, y_lengths):
        xb, yb = xb.to(dtype), yb.to(dtype)
        if len(xb) == 0 or len(yb) == 0:
            losses.append(xb[:0].sum() + yb[:0].sum())  # 0, with a zero gradient
            continue
        cost = cost_matrix(rows(xb, temperature), rows(yb, temperature), p)
        plan = transport_plan(cost, epsilon, n_iters, unit_marginals)
        if detach_plan:
            plan = plan.detach()
        losses.append((plan * cost).sum())
    return torch.stack(losses)


def valid_prefixes(x, y, x_lengths=None, y_lengths=None):
    """Per problem b, ``(x[b, :m_b], y[b, :n_b])``: its valid rows (all when lengths are None)."""
    for b in range(x.shape[0]):
        m = x.shape[1] if x_lengths is None else int(x_lengths[b])
        n = y.shape[1] if y_lengths is None else int(y_lengths[b])
        yield x[b, :m], y[b, :n]


def rows(x, temperature):
    """softmax(x / temperature) over the last dimension, or x itself when temperature == 0."""
    return torch.softmax(x / temperature, dim=-1) if temperature > 0 else x


def cost_matrix(a, c, p):
    """C_ij = sum_l |a_il - c_jl|^p for a [m, K] and c [n, K]."""
    diff = a[:, None, :] - c[None, :, :]
    return (diff.abs() if p == 1 else diff.square()).sum(-1)


def potentials(cost, epsilon, unit_marginals):
    """The log-domain Sinkhorn potentials (f, g): f = g = 0, then after each iteration
    ``f_i = eps log a_i - eps LSE_j((g_j - C_ij)/eps)``, ``g_j = eps log b_j - eps LSE_i((f_i - C_ij)/eps)``
    (an endless generator)."""
    m, n = cost.shape
    log_a = 0.0 if unit_marginals else -math.log(m)
    log_b = 0.0 if unit_marginals else -math.log(n)
    f = cost.new_zeros(m)
    g = cost.new_zeros(n)
    yield f, g
    while True:
        f = epsilon * log_a - epsilon * torch.logsumexp((g[None, :] - cost) / epsilon, dim=1)
        g = epsilon * log_b - epsilon * torch.logsumexp((f[:, None] - cost) / epsilon, dim=0)
        yield f, g


def plan_from_potentials(cost, f, g, epsilon):
    """P = exp((f_i + g_j - C_ij)/eps)."""
    return torch.exp((f[:, None] + g[None, :] - cost) / epsilon)


def transport_plan(cost, epsilon, n_iters, unit_marginals):
    """P after n_iters log-domain Sinkhorn iterations from f = g = 0."""
    f, g = next(itertools.islice(potentials(cost, epsilon, unit_marginals), n_iters, None))
    return plan_from_potentials(cost, f, g, epsilon)


def topk_probs(logits, lengths=None, k=50, temperature=1.0, std_scale=False, ranking="sequence"):
    """Reference of ``torch.ops.mlot.topk_probs``: full-vocabulary softmax, sort, gather.

    Returns (probs [B, L, k], indices): rows past the lengths are 0 (index -1 under 'token'
    ranking), columns past V are 0 with index -1.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch, length, vocab = logits.shape
    z = logits.to(dtype)
    if std_scale:
        z = z / (z.std(dim=-1, keepdim=True) + 1e-4)
    probs = torch.softmax(z / temperature, dim=-1)
    lengths = torch.full((batch,), length) if lengths is None else lengths.cpu()
    valid = (torch.arange(length)[None, :] < lengths[:, None]).to(logits.device)
    probs = torch.where(valid[..., None], probs, torch.zeros((), dtype=dtype, device=probs.device))
    if vocab < k:  # columns past V: probability 0, index -1
        probs = torch.nn.functional.pad(probs, (0, k - vocab))
    if ranking == "token":
        order = probs.argsort(dim=-1, descending=True, stable=True)[..., :k]
        out = probs.gather(2, order)
        order = order.masked_fill(~valid[..., None], -1)
    elif ranking == "sequence":
        order = probs.sum(1).argsort(dim=-1, descending=True, stable=True)[:, :k]
        out = probs.gather(2, order[:, None, :].expand(batch, length, k))
    elif ranking == "batch":
        order = probs.sum((0, 1)).argsort(descending=True, stable=True)[:k]
        out = probs[..., order]
    else:
        raise ValueError(f"topk_probs: ranking must be 'token', 'sequence' or 'batch', got {ranking!r}")
    return out, order.masked_fill(order >= vocab, -1)


def answer_topk_probs(logits, rows, lengths=None, targets=None, k=50, temperatures=(1.0,),
                      std_scale=False, ranking="sequence"):
    """Reference of ``torch.ops.mlot.topk_probs_forward`` (:func:`mlot_kernels.ops.topk_probs.
    answer_topk_probs`): the answer rows gathered, :func:`topk_probs` at each temperature, and
    the cross-entropy of every row that has a target. Returns (probs [n_t, B, A, k], indices
    [n_t, ...], ce [B, L])."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    batch, length, _ = logits.shape
    if rows is None:
        rows = torch.arange(length, device=logits.device).expand(batch, length)
    answers = logits[torch.arange(batch, device=logits.device)[:, None], rows.clamp(0, length - 1)]
    if lengths is not None:  # rows past the lengths may hold anything: never read
        valid = torch.arange(rows.shape[1], device=logits.device)[None, :] < lengths[:, None]
        answers = torch.where(valid[..., None], answers, torch.zeros((), dtype=logits.dtype,
                                                                     device=logits.device))
    out = [topk_probs(answers, lengths, k, t, std_scale, ranking) for t in temperatures]
    ce = row_cross_entropy(logits, targets, dtype)
    return torch.stack([p for p, _ in out]), torch.stack([i for _, i in out]), ce


def row_cross_entropy(logits, targets, dtype):
    """[B, L]: -log softmax(logits[b, l])[targets[b, l]] where the target is not -100, else 0."""
    ce = logits.new_zeros(logits.shape[:2], dtype=dtype)
    if targets is None:
        return ce
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)
    picked = log_p.gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return torch.where(targets != -100, -picked, ce)


def uld_distance(student_logits, student_rows, student_targets, teacher_logits, teacher_rows,
                 lengths, temperature=1.0):
    """Reference of ``torch.ops.mlot.uld_forward`` (:func:`mlot_kernels.ops.uld_distance.
    uld_distance`): for each pair i < lengths[b], the sum of |differences| of the two rows'
    probability vectors at ``temperature``, each sorted descending and zero-padded to the larger
    vocabulary; and the student's cross-entropy per row. Returns (distance [B, A], ce [B, L_S])."""
    float64 = torch.float64 in (student_logits.dtype, teacher_logits.dtype)
    dtype = torch.float64 if float64 else torch.float32
    vocab = max(student_logits.shape[-1], teacher_logits.shape[-1])

    def sorted_probs(row):
        p = torch.softmax(row.to(dtype) / temperature, -1).sort(descending=True).values
        return torch.nn.functional.pad(p, (0, vocab - p.shape[-1]))

    batch, answers = student_rows.shape
    zero = student_logits.new_zeros((), dtype=dtype)  # past the lengths: never read
    rows = [(sorted_probs(student_logits[b, student_rows[b, i]]) -  # valid pairs only
             sorted_probs(teacher_logits[b, teacher_rows[b, i]])).abs().sum()
            if i < int(lengths[b]) else zero for b in range(batch) for i in range(answers)]
    distance = torch.stack(rows).reshape(batch, answers) if rows else zero.expand(batch, answers)
    return distance, row_cross_entropy(student_logits, student_targets, dtype)


def linear_topk_probs(hidden, weight, bias, rows, lengths, targets=None, k=50,
                      temperatures=(1.0,), std_scale=False, ranking="sequence"):
    """Reference of ``torch.ops.mlot.linear_topk_probs``: :func:`answer_topk_probs` of the
    logits ``hidden @ weight.T + bias``, built."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return answer_topk_probs(logits, rows, lengths, targets, k, temperatures, std_scale, ranking)


def linear_uld_distance(student_hidden, student_weight, student_bias, student_rows,
                        student_targets, teacher_hidden, teacher_weight, teacher_bias,
                        teacher_rows, lengths, temperature=1.0):
    """Reference of ``torch.ops.mlot.linear_uld``: :func:`uld_distance` of both models' logits
    ``hidden @ weight.T + bias``, built."""
    linear = torch.nn.functional.linear
    return uld_distance(linear(student_hidden, student_weight, student_bias), student_rows,
                        student_targets, linear(teacher_hidden, teacher_weight, teacher_bias),
                        teacher_rows, lengths, temperature)
