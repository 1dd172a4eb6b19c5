"""Test oracles of the distillation losses, written from ../shared/docs/method.md step by step,
one sequence at a time, with plain PyTorch and nothing from mlot_kernels; and a batch builder.

- ``paper_oracle``: the steps of preset ``paper``;
- ``official_oracle``: what the released code computes (preset ``official``), in its own
  shapes: std scaling, shifted answer windows, zero-padded [B, L, V] probabilities, one batch
  column order, and the probability-domain Sinkhorn loop;
- ``uld_oracle``: the ULD baseline.
"""

import torch

IGNORE = -100


def make_batch(gen, student_answers, teacher_answers, v_student, v_teacher, dtype=torch.float64,
               prompt=(3, 2)):
    """Random logits and HF labels: per sequence a prompt of -100, an answer of the given length,
    then -100 padding. Returns (student_logits, teacher_logits, student_labels, teacher_labels)."""
    def one_model(answers, vocab, prompt_len):
        steps = prompt_len + max(answers) + 2
        labels = torch.full((len(answers), steps), IGNORE)
        for b, n in enumerate(answers):
            labels[b, prompt_len:prompt_len + n] = torch.randint(0, vocab, (n,), generator=gen)
        logits = 3 * torch.randn(len(answers), steps, vocab, generator=gen, dtype=torch.float64)
        return logits.to(dtype), labels

    s_logits, s_labels = one_model(student_answers, v_student, prompt[0])
    t_logits, t_labels = one_model(teacher_answers, v_teacher, prompt[1])
    return s_logits, t_logits, s_labels, t_labels


def make_hidden_batch(gen, student_answers, teacher_answers, v_student, v_teacher, size=12,
                      dtype=torch.float64, bias=True):
    """make_batch's labels with hidden states [B, T, H], output embeddings [V, H] and biases [V]
    (None without ``bias``) of both models, scaled so that the logits spread like make_batch's.
    Returns ((student hidden, weight, bias), (teacher hidden, weight, bias), student_labels,
    teacher_labels)."""
    s_logits, t_logits, s_labels, t_labels = make_batch(gen, student_answers, teacher_answers,
                                                        v_student, v_teacher)

    def one_model(logits, vocab):
        hidden = torch.randn(*logits.shape[:2], size, generator=gen, dtype=torch.float64)
        weight = 3 * torch.randn(vocab, size, generator=gen, dtype=torch.float64) / size ** 0.5
        b = torch.randn(vocab, generator=gen, dtype=torch.float64) if bias else None
        return tuple(None if x is None else x.to(dtype) for x in (hidden, weight, b))

    return one_model(s_logits, v_student), one_model(t_logits, v_teacher), s_labels, t_labels


def cross_entropy(logits, labels):
    """HF causal-LM token-mean cross-entropy (0 without answer tokens), token by token."""
    total, count = logits.new_zeros(()), 0
    for b in range(labels.shape[0]):
        for i in range(labels.shape[1] - 1):
            if labels[b, i + 1] != IGNORE:
                total = total - torch.log_softmax(logits[b, i].to(torch.promote_types(logits.dtype, torch.float32)), -1)[labels[b, i + 1]]
                count += 1
    return total / max(count, 1)


def pad_columns(p, k):
    return torch.nn.functional.pad(p, (0, max(k - p.shape[-1], 0)))[..., :k]


def paper_oracle(s_logits, t_logits, s_labels, t_labels, k=50, alpha=0.15, beta=0.1, gamma=0.1,
                 epsilon=0.1, n_iters=20, tau=1.0, tau_sd=2.0):
    """Preset ``paper``: dict of ce, had, sl, sd, distill, loss."""
    def answer_rows(logits, labels):
        return logits[[i for i in range(labels.shape[0] - 1) if labels[i + 1] != IGNORE]]

    def truncated(rows, temperature):  # steps 1-3: softmax, sequence mass order, top k
        p = torch.softmax(rows / temperature, -1)
        order = torch.argsort(p.sum(0), descending=True)
        return pad_columns(p[:, order], k)

    had, sl, sd = [], [], []
    for b in range(s_labels.shape[0]):
        t, s = answer_rows(t_logits[b], t_labels[b]), answer_rows(s_logits[b], s_labels[b])
        tk, sk = truncated(t, tau), truncated(s, tau)
        n = min(len(t), len(s))
        had.append((tk[:n] - sk[:n]).abs().sum(-1).sum() / max(n, 1))
        cols = min(t.shape[-1], s.shape[-1], k)  # columns past both vocabularies: 0 * log 0 = 0
        assert cols == min(t.shape[-1], k), "a student vocabulary below min(V_T, k) makes SL infinite"
        sl.append(-(tk[:n, :cols] * torch.log(sk[:n, :cols])).sum(-1).sum() / max(n, 1))
        if n == 0:
            sd.append(tk.sum() * 0)
            continue
        a, c = truncated(t, tau_sd), truncated(s, tau_sd)
        cost = (a[:, None, :] - c[None, :, :]).abs().sum(-1)
        f, g = cost.new_zeros(len(t)), cost.new_zeros(len(s))
        for _ in range(n_iters):  # unit marginals: log a = log b = 0
            f = -epsilon * torch.logsumexp((g[None, :] - cost) / epsilon, 1)
            g = -epsilon * torch.logsumexp((f[:, None] - cost) / epsilon, 0)
        sd.append((torch.exp((f[:, None] + g[None, :] - cost) / epsilon) * cost).sum())
    out = dict(ce=cross_entropy(s_logits, s_labels), had=torch.stack(had).mean(),
               sl=torch.stack(sl).mean(), sd=torch.stack(sd).mean())
    out["distill"] = alpha * (out["had"] + beta * out["sl"] + gamma * out["sd"])
    out["loss"] = out["ce"] + out["distill"]
    return out


def official_oracle(s_logits, t_logits, s_labels, t_labels, k=50):
    """Preset ``official``, as method.md describes the released code: dict of ce, had, sl, sd,
    distill, loss."""
    def scale(z):  # step 1
        return z / (z.std(-1, keepdim=True) + 1e-4)

    def span(labels):  # step 2
        size = int((labels != IGNORE).sum())
        leading = next((i for i, v in enumerate(labels.tolist()) if v != IGNORE), len(labels))
        return leading - 1, size

    batch = s_labels.shape[0]
    s_spans = [(shift, max(size - 1, 0)) for shift, size in map(span, s_labels)]
    t_spans = [span(labels) for labels in t_labels]
    length = max(size for _, size in s_spans + t_spans)

    def probs(logits, spans):
        out = logits.new_zeros(batch, length, logits.shape[-1])
        rows = []
        for b, (shift, size) in enumerate(spans):
            p = torch.softmax(scale(logits[b, shift:shift + size]), -1)
            rows.append(torch.cat([p, p.new_zeros(length - size, p.shape[-1])]))
        return torch.stack(rows) if rows else out

    def top_k(p):  # step 3: one order for the batch
        order = torch.argsort(p.sum((0, 1)), descending=True)
        return pad_columns(p[..., order], k)

    sk, tk = top_k(probs(s_logits, s_spans)), top_k(probs(t_logits, t_spans))
    had = []
    for b in range(batch):  # step 4
        n = min(s_spans[b][1], t_spans[b][1])
        had.append((sk[b, :n] - tk[b, :n]).abs().sum(-1).sum() / max(n, 1))
    sl = -(torch.softmax(sk, -1) * torch.log_softmax(tk, -1)).sum(-1).mean()  # step 5
    sd = 0
    for b in range(batch):  # step 6, the released loop
        a, c = torch.softmax(tk[b] / 2, -1), torch.softmax(sk[b] / 2, -1)
        w = torch.cdist(a, c, p=1)
        kernel = torch.exp(-w / 0.1)
        for _ in range(10):
            kernel = kernel / kernel.sum(1, keepdim=True)
            kernel = kernel / kernel.sum(0, keepdim=True)
        sd = sd + 0.001 * (kernel * w).sum()
    out = dict(ce=cross_entropy(s_logits, s_labels), had=torch.stack(had).mean(), sl=sl, sd=sd)
    out["distill"] = 1.5 * (out["had"] + 0.1 * sl + 0.1 * sd)  # step 7
    out["loss"] = out["ce"] + out["distill"]
    return out


def uld_oracle(s_logits, t_logits, s_labels, t_labels, weight=1.5):
    """ULD: sorted full probability vectors, zero-padded to the larger vocabulary."""
    vocab = max(s_logits.shape[-1], t_logits.shape[-1])
    terms = []
    for b in range(s_labels.shape[0]):
        rows = []
        for logits, labels in ((s_logits[b], s_labels[b]), (t_logits[b], t_labels[b])):
            idx = [i for i in range(labels.shape[0] - 1) if labels[i + 1] != IGNORE]
            p = torch.softmax(logits[idx], -1).sort(-1, descending=True).values
            rows.append(pad_columns(p, vocab))
        n = min(len(rows[0]), len(rows[1]))
        terms.append((rows[0][:n] - rows[1][:n]).abs().sum(-1).sum() / max(n, 1))
    uld = torch.stack(terms).mean()
    ce = cross_entropy(s_logits, s_labels)
    return dict(loss=ce + weight * uld, ce=ce, distill=weight * uld, uld=uld)
