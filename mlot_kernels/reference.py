"""Plain PyTorch references of the ops: the ground truth of the tests.

Each follows its contract (docs in the op's module) literally, one problem at a time, with
autograd through every step. Pass float64 inputs for a float64 evaluation.
"""

import torch


def sinkhorn_loss(x, y, x_lengths=None, y_lengths=None, epsilon=0.1, n_iters=20,
                  temperature=0.0, p=1, unit_marginals=False, detach_plan=False):
    """Reference of ``torch.ops.mlot.sinkhorn_loss``: log-domain Sinkhorn, [B] losses."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    losses = []
    for b in range(x.shape[0]):
        m = x.shape[1] if x_lengths is None else int(x_lengths[b])
        n = y.shape[1] if y_lengths is None else int(y_lengths[b])
        xb, yb = x[b, :m].to(dtype), y[b, :n].to(dtype)
        if m == 0 or n == 0:
            losses.append(xb[:0].sum() + yb[:0].sum())  # 0, with a zero gradient
            continue
        a = torch.softmax(xb / temperature, dim=-1) if temperature > 0 else xb
        c = torch.softmax(yb / temperature, dim=-1) if temperature > 0 else yb
        diff = a[:, None, :] - c[None, :, :]
        cost = (diff.abs() if p == 1 else diff.square()).sum(-1)
        log_a = 0.0 if unit_marginals else -torch.log(torch.tensor(float(m), dtype=dtype))
        log_b = 0.0 if unit_marginals else -torch.log(torch.tensor(float(n), dtype=dtype))
        f = torch.zeros(m, dtype=dtype)
        g = torch.zeros(n, dtype=dtype)
        for _ in range(n_iters):
            f = epsilon * log_a - epsilon * torch.logsumexp((g[None, :] - cost) / epsilon, dim=1)
            g = epsilon * log_b - epsilon * torch.logsumexp((f[:, None] - cost) / epsilon, dim=0)
        plan = torch.exp((f[:, None] + g[None, :] - cost) / epsilon)
        if detach_plan:
            plan = plan.detach()
        losses.append((plan * cost).sum())
    return torch.stack(losses)
