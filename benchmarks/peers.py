r"""What users would otherwise run for the ops: eager PyTorch, torch.compile, POT and GeomLoss.

**Sinkhorn loss at equal iteration counts.** ``released_loop``, ``batched_log_domain``,
``compiled_log_domain``, ``pot_batch`` and ``pot_sinkhorn_log`` share one signature::

    fn(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20, temperature=2.0,
       unit_marginals=True) -> Tensor [B]

with x [B, M, K] (teacher side), y [B, N, K], and lengths [B] integer tensors of valid prefix
lengths (None: all positions valid; the peers assume every length is >= 1). Each computes, with
autograd through every step, what ``mlot_kernels.sinkhorn_loss(x, y, x_lengths, y_lengths,
epsilon=epsilon, n_iters=n_iters, temperature=temperature, p=1, unit_marginals=unit_marginals)``
computes, up to rounding: for each problem b, on its valid rows ``i < m_b`` and ``j < n_b``,

- ``a_i = softmax(x[b, i] / T)``, ``c_j = softmax(y[b, j] / T)``, ``C_ij = |a_i - c_j|_1``;
- log-marginals ``la_i = lb_j = 0`` (unit marginals) or ``la_i = -log m_b``, ``lb_j = -log n_b``;
- ``f = g = 0``, then ``n_iters`` times ``f_i = eps la_i - eps LSE_j((g_j - C_ij)/eps)`` and
  ``g_j = eps lb_j - eps LSE_i((f_i - C_ij)/eps)`` (rows first, then columns);
- ``P_ij = exp((f_i + g_j - C_ij)/eps)`` and ``loss_b = <P, C> = sum_ij P_ij C_ij``.

**GeomLoss** (``geomloss_sinkhorn``) cannot be run for a fixed number of iterations (it anneals
epsilon), nor with the L1 cost; benchmarks/tolerance.py compares it at equal accuracy instead.

**The released code's whole loss** (``released_loss``): method.md's preset ``official``,
written as the released code computes it.

**Vocabulary truncation:** ``eager_topk_probs`` takes full-length logits [B, L, V] and computes
what ``torch.ops.mlot.topk_probs`` computes without lengths.

**ULD: TRL's GOLD** (``gold_uld_loss``, ``gold_uld_as_uld_loss``): ``ULDLoss`` of
``trl.experimental.gold`` (TRL 1.16), what a TRL user runs for cross-tokenizer ULD. Configured by
:data:`GOLD_AS_ULD` it computes ``mlot_kernels.uld_loss``'s total; its defaults differ in which
rows they read (:func:`gold_uld_loss`).

tests/test_benchmark_peers.py checks all of them, so the benchmarks compare equal work. POT,
GeomLoss and TRL are optional benchmark dependencies, imported by the functions that use them.
"""

import functools
import math
import warnings

import torch
import torch.fx.experimental._config as fx_config

from mlot_kernels.ops.reference import valid_prefixes

IGNORE_INDEX = -100


def _valid(lengths, batch, size, device):
    """[B, size] bool: ``i < lengths[b]`` (every position when lengths is None)."""
    if lengths is None:
        return torch.ones(batch, size, dtype=torch.bool, device=device)
    return torch.arange(size, device=device)[None, :] < lengths.to(device)[:, None]


def _weights(lengths, batch, size, unit_marginals, like):
    """[B, size] marginal weights of ``like``'s dtype and device: 1 (unit) or 1/m_b
    (probability) on the valid positions, 0 on padding."""
    valid = _valid(lengths, batch, size, like.device).to(like.dtype)
    return valid if unit_marginals else valid / valid.sum(1, keepdim=True)


def _rows(x, y, temperature):
    """The softmax rows ``a = softmax(x / T)``, ``c = softmax(y / T)``."""
    return torch.softmax(x / temperature, dim=-1), torch.softmax(y / temperature, dim=-1)


def released_loop(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20,
                  temperature=2.0, unit_marginals=True):
    """The released MultiLevelOT code's Sinkhorn: probability domain, one sequence at a time.

    For each b, on the valid rows: ``A = softmax(x[b, :m_b]/T)``, ``Bm = softmax(y[b, :n_b]/T)``,
    ``W = cdist(A, Bm, p=1)``, ``K = exp(-W/eps)``, then ``n_iters`` times row then column
    normalisation ``K = K / K.sum(1)``, ``K = K / K.sum(0)``, and ``sum(K * W)``; autograd
    through every step. That is the unit-marginal log-domain iteration exponentiated
    (``K = P``), so only ``unit_marginals=True`` exists: False raises a ValueError. Returns [B].
    """
    if not unit_marginals:
        raise ValueError("released_loop: unit_marginals must be True (the released code has "
                         "unit marginals only), got False")
    losses = []
    for x_b, y_b in valid_prefixes(x, y, x_lengths, y_lengths):
        a, c = _rows(x_b, y_b, temperature)
        w = torch.cdist(a, c, p=1)
        k = torch.exp(-w / epsilon)
        for _ in range(n_iters):
            k = k / k.sum(1, keepdim=True)
            k = k / k.sum(0, keepdim=True)
        losses.append((k * w).sum())
    return torch.stack(losses)


def batched_log_domain(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20,
                       temperature=2.0, unit_marginals=True):
    """Batched log-domain Sinkhorn in eager PyTorch, autograd through every step. Returns [B].

    The whole batch at once: ``C`` [B, M, N] = ``|a_i - c_j|_1`` over all positions, padded
    ones included; padding takes no part through the log-weights, -inf on padded positions:
    ``f`` and ``g`` start at 0 on valid positions and -inf on padded ones, and each update
    adds ``eps la_i`` (or ``eps lb_j``), so a padded potential stays -inf, its terms in every
    LSE are exp(-inf) = 0 and its plan entries are 0 (no NaN, in values or gradients, while
    every length is >= 1).
    """
    a, c = _rows(x, y, temperature)
    cost = (a[:, :, None, :] - c[:, None, :, :]).abs().sum(-1)  # [B, M, N]
    batch, m, n = cost.shape
    log_a = _weights(x_lengths, batch, m, unit_marginals, cost).log()  # 0 or -log m_b; -inf
    log_b = _weights(y_lengths, batch, n, unit_marginals, cost).log()
    f = torch.where(log_a > -math.inf, 0.0, log_a)
    g = torch.where(log_b > -math.inf, 0.0, log_b)
    for _ in range(n_iters):
        f = epsilon * log_a - epsilon * torch.logsumexp((g[:, None, :] - cost) / epsilon, dim=2)
        g = epsilon * log_b - epsilon * torch.logsumexp((f[:, :, None] - cost) / epsilon, dim=1)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cost) / epsilon)
    return (plan * cost).sum((1, 2))


@functools.cache
def _compiled_log_domain():
    return torch.compile(batched_log_domain, dynamic=True)


def compiled_log_domain(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20,
                        temperature=2.0, unit_marginals=True):
    """``torch.compile(batched_log_domain, dynamic=True)``, created on the first call, and always
    called with lengths (full ones when none are given, which computes the same) and traced
    without duck sizing (equal sizes M = N get no shared symbol), so that one compiled graph
    serves every case (B, M, N and K are dynamic). A cold compile of the forward and backward of 20
    iterations takes about 2.5 minutes on 2 CPU cores; another n_iters or marginal mode compiles
    again (epsilon and temperature do not)."""
    if x_lengths is None:
        x_lengths = torch.full((x.shape[0],), x.shape[1], device=x.device)
    if y_lengths is None:
        y_lengths = torch.full((y.shape[0],), y.shape[1], device=y.device)
    with fx_config.patch(use_duck_shape=False):
        return _compiled_log_domain()(x, y, x_lengths, y_lengths, epsilon=epsilon,
                                      n_iters=n_iters, temperature=temperature,
                                      unit_marginals=unit_marginals)


def pot_batch(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20,
              temperature=2.0, unit_marginals=True):
    """POT's batched solver (``ot.batch``, torch backend), autograd through every step.

    ``M = ot.batch.dist_batch(a, c, metric="minkowski", p=1)``, which is ``sum_l |a_il - c_jl|``
    (POT's Lp cost to the power q = p = 1: the L1 cost), then ``ot.batch.solve_batch(M,
    reg=epsilon, a=wa, b=wb, max_iter=n_iters, tol=0, method="log_sinkhorn",
    grad="autodiff").value_linear`` = ``sum_ij T_ij M_ij``. Its iteration is the op's, rows
    first: ``u = log wa - LSE_j(-M/eps + v)``, ``v = log wb - LSE_i(-M/eps + u)`` with
    ``u = f/eps``, ``v = g/eps``. The weights are the validity masks (unit marginals) or
    mask / length (probability marginals), so padded potentials are -inf after their first
    update. The solver has no lengths and starts from v = 0 on every column, padded ones
    included, so padded columns get the cost ``2 + 1000 eps`` (L1 costs between probability
    vectors are at most 2): their kernel entries are e^-1000 times any valid one, 0 in floating
    point, and the first row update is the op's. Every 10 iterations POT also computes the plan
    and its marginal error to test convergence (extra work, and a host sync on GPU), left as is
    since that is what users run. POT fails with max_iter = 0, so ``n_iters`` must be >= 1 (a
    ValueError otherwise). Returns [B].
    """
    import ot

    if n_iters < 1:
        raise ValueError(f"pot_batch: n_iters must be >= 1 (POT's batched solver fails with "
                         f"max_iter=0), got {n_iters}")
    a, c = _rows(x, y, temperature)
    cost = ot.batch.dist_batch(a, c, metric="minkowski", p=1)  # [B, M, N]
    batch, m, n = cost.shape
    padded_columns = ~_valid(y_lengths, batch, n, cost.device)[:, None, :]
    cost = cost.masked_fill(padded_columns, 2.0 + 1000.0 * epsilon)
    result = ot.batch.solve_batch(cost, reg=epsilon,
                                  a=_weights(x_lengths, batch, m, unit_marginals, cost),
                                  b=_weights(y_lengths, batch, n, unit_marginals, cost),
                                  max_iter=n_iters, tol=0, method="log_sinkhorn", grad="autodiff")
    return result.value_linear


def pot_sinkhorn_log(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, n_iters=20,
                     temperature=2.0, unit_marginals=True):
    """POT's log-domain Sinkhorn (``ot.bregman.sinkhorn_log``), one problem at a time, autograd
    through every step.

    For each b, on the valid rows: ``M = ot.dist(a, c, metric="cityblock", use_tensor=True)``
    (the L1 cost, in one broadcast rather than POT's default loop over the K coordinates) and
    weights ``wa``, ``wb`` = ones (unit marginals) or 1/m_b, 1/n_b. POT updates its column
    potential before its row potential, so the TRANSPOSED problem is solved,
    ``ot.bregman.sinkhorn_log(wb, wa, M.T, epsilon, numItermax=n_iters, stopThr=0, warn=False)``,
    which updates the op's f first, and its plan is transposed back: ``loss_b = sum(M * plan)``.
    POT computes a marginal error every 10 iterations (never below stopThr = 0). Returns [B].
    """
    import ot

    losses = []
    for x_b, y_b in valid_prefixes(x, y, x_lengths, y_lengths):
        a, c = _rows(x_b, y_b, temperature)
        m, n = len(a), len(c)
        cost = ot.dist(a, c, metric="cityblock", use_tensor=True)
        wa = cost.new_full((m,), 1.0 if unit_marginals else 1.0 / m)
        wb = cost.new_full((n,), 1.0 if unit_marginals else 1.0 / n)
        plan = ot.bregman.sinkhorn_log(wb, wa, cost.T, epsilon, numItermax=n_iters, stopThr=0,
                                       warn=False).T
        losses.append((cost * plan).sum())
    return torch.stack(losses)


def samples_loss_inputs(x, y, x_lengths=None, y_lengths=None, *, temperature=2.0):
    """GeomLoss's measures: (α [B, M], a [B, M, K], β [B, N], c [B, N, K]) with
    ``a = softmax(x/T)``, ``c = softmax(y/T)`` and probability weights, 1/m_b on the valid
    positions and 0 on padding."""
    a, c = _rows(x, y, temperature)
    alpha = _weights(x_lengths, x.shape[0], x.shape[1], False, a)
    beta = _weights(y_lengths, y.shape[0], y.shape[1], False, c)
    return alpha, a, beta, c


def geomloss_sinkhorn(x, y, x_lengths=None, y_lengths=None, *, epsilon=0.1, temperature=2.0,
                      scaling=0.5, backend="tensorized"):
    r"""GeomLoss's entropic OT, ``geomloss.SamplesLoss("sinkhorn", p=1, blur=epsilon,
    scaling=scaling, debias=False, backend=backend)(α, a, β, c)`` on :func:`samples_loss_inputs`.
    Returns [B].

    Not the op's loss, and not at a fixed iteration count:

    - GeomLoss's p = 1 cost is the Euclidean norm ``C_ij = |a_i - c_j|_2``, not L1 (and the
      tensorized backend computes it as ``sqrt(max(|a|^2 + |c|^2 - 2 a.c, 1e-8))``);
    - its temperature is ``blur^p``, so ``blur = epsilon`` for p = 1;
    - it anneals: epsilon-scaling from the diameter of the points down to ``epsilon`` by
      factors ``scaling``, one symmetric (averaged) update of both potentials per value, and
      no way to fix the count; benchmarks/tolerance.py finds the scaling that reaches the op's
      accuracy;
    - the value is the dual ``OT_eps = <α, f> + <β, g>`` of the probability-marginal problem,
      not ``<P, C>``, and its gradient comes from the envelope theorem (the last update only).

    ``backend="online"`` needs pykeops (it compiles its formulas on first use).
    """
    import geomloss

    loss = geomloss.SamplesLoss("sinkhorn", p=1, blur=epsilon, scaling=scaling, debias=False,
                                backend=backend)
    return loss(*samples_loss_inputs(x, y, x_lengths, y_lengths, temperature=temperature))


def released_loss(student_logits, teacher_logits, student_labels, teacher_labels):
    """The released MultiLevelOT code's whole loss (method.md, preset ``official``), in eager
    PyTorch as that code computes it. Returns the scalar total.

    1. Every logit row of both models: ``z / (std(z, unbiased) + 1e-4)``, softmax over the
       full vocabulary (batched).
    2. Answer windows per sequence: ``shift`` = leading -100 labels - 1, ``size`` = labels that
       are not -100 (the student's size - 1: its EOS position is dropped); rows
       ``[shift, shift + size)``, left-aligned and zero-padded to L = the largest size of both.
    3. One column order per model for the batch: the vocabulary sorted by ``p.sum((0, 1))``,
       descending, and the first k = 50 columns kept (zero columns past V): ``s^k``, ``t^k``.
    4. ``HAD = mean_b`` of the mean over the first ``min(size_S, size_T)`` rows of
       ``sum |s^k - t^k|``; ``SL = -mean over all B*L rows of sum softmax(s^k) log_softmax(t^k)``;
       ``SD = 0.001 sum_b released_loop(t^k, s^k)`` over all L rows (padded rows included;
       epsilon 0.1, 10 iterations, temperature 2, unit marginals).
    5. ``CE``: Hugging Face's shifted token-mean cross-entropy, logits ``[:, :-1]`` against
       labels ``[:, 1:]`` with ignore_index -100 (in float32, or float64 for float64 logits;
       NaN without answer tokens, as in Hugging Face).

    ``total = CE + 1.5 * (HAD + 0.1 SL + 0.1 SD)``.
    """
    k = 50

    def probs(logits, labels, drop_eos):
        z = logits / (logits.std(-1, keepdim=True) + 1e-4)
        p = torch.softmax(z, -1)
        answer = labels != IGNORE_INDEX
        shifts = (answer.int().argmax(1) - 1).tolist()
        sizes = (answer.sum(1) - int(drop_eos)).clamp(min=0).tolist()
        return p, shifts, sizes

    def truncated(p, shifts, sizes, length):
        rows = torch.stack([torch.nn.functional.pad(p[b, shift:shift + size],
                                                    (0, 0, 0, length - size))
                            for b, (shift, size) in enumerate(zip(shifts, sizes))])
        order = rows.sum((0, 1)).argsort(descending=True)[:k]
        return torch.nn.functional.pad(rows[..., order], (0, k - len(order)))

    s_p, s_shifts, s_sizes = probs(student_logits, student_labels, drop_eos=True)
    t_p, t_shifts, t_sizes = probs(teacher_logits, teacher_labels, drop_eos=False)
    length = max(s_sizes + t_sizes)
    s_k = truncated(s_p, s_shifts, s_sizes, length)
    t_k = truncated(t_p, t_shifts, t_sizes, length)

    n = torch.minimum(torch.tensor(s_sizes), torch.tensor(t_sizes)).to(s_k.device)
    aligned = torch.arange(length, device=s_k.device)[None, :] < n[:, None]
    had = (((s_k - t_k).abs().sum(-1) * aligned).sum(1) / n.clamp(min=1)).mean()
    sl = -(torch.softmax(s_k, -1) * torch.log_softmax(t_k, -1)).sum(-1).mean()
    sd = 0.001 * released_loop(t_k, s_k, epsilon=0.1, n_iters=10, temperature=2.0).sum()

    logits = student_logits[:, :-1]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                           student_labels[:, 1:].reshape(-1),
                                           ignore_index=IGNORE_INDEX)
    return ce + 1.5 * (had + 0.1 * sl + 0.1 * sd)


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


# GOLDConfig options under which ULDLoss computes mlot_kernels.uld_loss(...)["loss"] (gold_uld_loss)
GOLD_AS_ULD = dict(use_extended_uld=False, uld_token_merge_strategy="bayesian",
                   uld_use_hybrid_loss=False, uld_crossentropy_weight=1.0,
                   uld_skip_teacher_eos=False)


@functools.cache
def _gold_uld(options):
    """TRL GOLD's ``ULDLoss(GOLDConfig(use_uld_loss=True, bf16=False, report_to='none',
    **dict(options)))``; ``bf16=False`` because GOLDConfig's default bf16=True fails without a
    GPU, and it only sets the trainer's precision, which ULDLoss does not read."""
    with warnings.catch_warnings():  # TRLExperimentalWarning; TrainingArguments' FutureWarnings
        warnings.simplefilter("ignore")
        from trl.experimental.gold import GOLDConfig
        from trl.experimental.gold.gold_trainer import ULDLoss

        return ULDLoss(GOLDConfig(use_uld_loss=True, bf16=False, report_to="none",
                                  **dict(options)))


def gold_uld_loss(student_logits, teacher_logits, student_labels, teacher_labels, *,
                  student_input_ids=None, teacher_input_ids=None, student_byte_offsets=None,
                  teacher_byte_offsets=None, **config):
    r"""TRL GOLD's ``ULDLoss`` (``trl/experimental/gold/gold_trainer.py``, TRL 1.16) with
    ``GOLDConfig(**config)`` (and ``use_uld_loss=True``), called as GOLDTrainer calls it: the
    scalar total. The input ids default to ``labels.clamp(min=0)``: at the answer positions, the
    only ones GOLD reads, Hugging Face labels are the input ids.

    What it computes, per sequence b, in eager PyTorch (a Python loop over the batch):

    - the answer: ``start`` = the first position whose label is not -100 and ``size`` = the
      number of such labels (so one contiguous answer is assumed), minus 1 on each side whose
      ``uld_skip_*_eos`` is set (the default for both);
    - the rows: ``[start, start + size)`` with ``uld_token_merge_strategy="observed"`` (the
      default): the logits AT the answer tokens, each of which predicts the token after it;
      ``[start - 1, start + size - 1)`` with ``"bayesian"``: the logits that predict the answer
      tokens, the rows of ``mlot_kernels.uld_loss`` (``answer_span="labels"``). (Bayesian with
      ``start == 0`` drops the first row, or aligned group, of both sides.);
    - ``p = softmax(z / T)`` over the full vocabulary of each row, the student at
      ``uld_student_temperature``, the teacher at ``uld_teacher_temperature`` (1 and 1);
    - the alignment: ``use_extended_uld=False``: the first ``n = min(size_S, size_T)`` rows of
      each side, position by position; ``True`` (the default): both sides' byte offsets of the
      answer tokens are walked in Python into groups that end where both tokenizers end a token
      at the same byte, and each group's rows are merged into one: the first row's
      distribution times the probabilities of the group's later tokens at their own rows
      (``"observed"``; ``"bayesian"``: the last row's times the earlier tokens'), clamped at
      1e-8; a pair with an empty side is dropped. One tokenizer on both sides gives groups of one
      token: the same rows as ``False``;
    - ``ULD_b = sum |sort(p_S) - sort(p_T)|`` over the aligned rows, each row sorted descending
      and zero-padded to the larger vocabulary, divided by their number; 0 for a sequence
      without answer rows on either side (``uld_use_hybrid_loss``, off by default, replaces it
      by a weighted sum of a JSD over the tokens whose strings both vocabularies share and this
      sorted distance over the rest);
    - the probabilities, their sort and the distance in the logits' dtype (no upcast:
      bfloat16 logits give bfloat16 probabilities);
    - ``total = uld_crossentropy_weight * CE + uld_distillation_weight * mean_b ULD_b`` with
      ``CE`` Hugging Face's shifted token-mean cross-entropy of the student (NaN without
      labels); weights 0 and 1 by default, so the default total is the distance term alone.

    ``mlot_kernels.uld_loss(weight=w, temperature=T, skip_student_eos=e)`` computes the same
    value and gradients, up to rounding, when both answers are one contiguous span starting after
    position 0, with :data:`GOLD_AS_ULD` (positional alignment, bayesian rows, no hybrid part, CE
    weight 1, the teacher's EOS kept) and ``uld_distillation_weight=w``, both temperatures ``T``,
    ``uld_skip_student_eos=e`` (:func:`gold_uld_as_uld_loss`; tests/test_benchmark_peers.py).
    """
    ids = [labels.clamp(min=0) if ids is None else ids
           for ids, labels in ((student_input_ids, student_labels),
                               (teacher_input_ids, teacher_labels))]
    loss = _gold_uld(tuple(sorted(config.items())))(
        student_logits, teacher_logits, student_labels, teacher_labels, *ids,
        student_byte_offsets=student_byte_offsets, teacher_byte_offsets=teacher_byte_offsets)
    return loss.reshape(())  # a batch without answers gives shape [1]


def gold_uld_as_uld_loss(student_logits, teacher_logits, student_labels, teacher_labels, *,
                         weight=1.5, temperature=1.0, skip_student_eos=False):
    """:func:`gold_uld_loss` configured to compute ``mlot_kernels.uld_loss(student_logits,
    teacher_logits, student_labels, teacher_labels, weight=weight, temperature=temperature,
    skip_student_eos=skip_student_eos)["loss"]`` (one contiguous answer per sequence, after
    position 0)."""
    return gold_uld_loss(student_logits, teacher_logits, student_labels, teacher_labels,
                         **GOLD_AS_ULD, uld_distillation_weight=float(weight),
                         uld_student_temperature=float(temperature),
                         uld_teacher_temperature=float(temperature),
                         uld_skip_student_eos=bool(skip_student_eos))
