"""What users would otherwise run for the ops, in eager PyTorch.

Sinkhorn loss, as method.md describes it: ``released_loop`` and ``batched_log_domain`` take
full-length batches ``x`` [B, M, K] and ``y`` [B, N, K] and compute what
``torch.ops.mlot.sinkhorn_loss`` computes with ``p=1`` and the given options.

Vocabulary truncation: ``eager_topk_probs`` takes full-length logits [B, L, V] and computes what
``torch.ops.mlot.topk_probs`` computes without lengths.

tests/test_benchmark_peers.py checks both, so the benchmarks compare equal work.
"""

import math

import torch


def released_loop(x, y, epsilon=0.1, n_iters=20, temperature=2.0):
    """The released MultiLevelOT code's Sinkhorn, unit marginals, probability domain.

    One sequence at a time: ``A = softmax(x[b]/T)``, ``W = cdist(A, Bm, p=1)``,
    ``K = exp(-W/eps)``, then ``n_iters`` times row then column normalisation, and
    ``sum(K * W)``; autograd through every step. Returns [B].
    """
    losses = []
    for b in range(x.shape[0]):
        a = torch.softmax(x[b] / temperature, dim=-1)
        c = torch.softmax(y[b] / temperature, dim=-1)
        w = torch.cdist(a, c, p=1)
        k = torch.exp(-w / epsilon)
        for _ in range(n_iters):
            k = k / k.sum(1, keepdim=True)
            k = k / k.sum(0, keepdim=True)
        losses.append((k * w).sum())
    return torch.stack(losses)


def batched_log_domain(x, y, epsilon=0.1, n_iters=20, temperature=2.0, unit_marginals=True):
    """Batched log-domain Sinkhorn in eager PyTorch (L1 cost), autograd through every step."""
    a = torch.softmax(x / temperature, dim=-1)
    c = torch.softmax(y / temperature, dim=-1)
    cost = (a[:, :, None, :] - c[:, None, :, :]).abs().sum(-1)  # [B, M, N]
    m, n = cost.shape[1], cost.shape[2]
    log_a = 0.0 if unit_marginals else -math.log(m)  # a Python float: exact in float64 too
    log_b = 0.0 if unit_marginals else -math.log(n)
    f = cost.new_zeros(cost.shape[0], m)
    g = cost.new_zeros(cost.shape[0], n)
    for _ in range(n_iters):
        f = epsilon * log_a - epsilon * torch.logsumexp((g[:, None, :] - cost) / epsilon, dim=2)
        g = epsilon * log_b - epsilon * torch.logsumexp((f[:, :, None] - cost) / epsilon, dim=1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / epsilon)
    return (plan * cost).sum((1, 2))


def eager_topk_probs(logits, k=50, temperature=1.0, std_scale=False, ranking="sequence"):
    """Eager softmax, sort, gather: the top-k truncation as users would write it without the op.

    ``p = softmax(z / T)`` over the whole vocabulary (float32, or float64 for float64 logits;
    ``z = logits / (std + 1e-4)`` first with std_scale), which autograd keeps [B, L, V]; then the
    columns in descending order of mass, the first ``k`` kept, and ``p`` gathered there:

    - ``'sequence'``: ``order = p.sum(1).topk(k).indices`` [B, k],
      ``probs = p.gather(2, order[:, None].expand(B, L, k))``;
    - ``'token'``: ``probs, order = p.topk(k, dim=-1)``, each row by its own mass;
    - ``'batch'``: ``order = p.sum((0, 1)).topk(k).indices`` [k], ``probs = p[..., order]``.

    Returns (probs [B, L, k], order). Needs V >= k; ties may be broken either way.
    """
    batch, length, _ = logits.shape
    z = logits if logits.dtype == torch.float64 else logits.float()
    if std_scale:
        z = z / (z.std(dim=-1, keepdim=True) + 1e-4)
    p = torch.softmax(z / temperature, dim=-1)
    if ranking == "sequence":
        order = p.sum(1).topk(k).indices
        return p.gather(2, order[:, None].expand(batch, length, k)), order
    if ranking == "token":
        probs, order = p.topk(k, dim=-1)
        return probs, order
    if ranking == "batch":
        order = p.sum((0, 1)).topk(k).indices
        return p[..., order], order
    raise ValueError(f"eager_topk_probs: ranking must be 'token', 'sequence' or 'batch', got {ranking!r}")
