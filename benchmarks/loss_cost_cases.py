"""The cost of the whole loss at a realistic size, against plain cross-entropy and against what the
hidden-state path replaces: the cases, implementations and steps shared by the pytest-benchmark
suite (benchmarks/test_loss_cost.py), the report (benchmarks/report.py) and the memory probe
(benchmarks/memory.py).

A case is a dict: B sequences of T tokens, a student vocabulary V_S and a teacher's V_T, H-wide
hidden states, and per sequence ``answer`` labelled student tokens (the teacher's answer is
``teacher_answer`` tokens: another tokenizer splits the same text differently) after a prompt of
``prompt`` tokens, the rest -100. The logits implementations get float32 logits [B, T, V] = 3 *
standard normal; the hidden ones hidden states [B, T, H] (standard normal) and output embeddings
[V, H] (normal, std 3 / sqrt(H), so that the logits spread alike), without bias; all in the
case's dtype (float32 on CPU, bfloat16 on CUDA). The objective is
the total loss (cross-entropy + distillation), differentiated with respect to the student's
inputs: its logits, or its hidden states and output embedding; the teacher is frozen.

Each implementation is compared with a baseline (:data:`BASELINES`): the losses from logits with
plain cross-entropy from the same logits (``ce``, Hugging Face's), the hidden-state path with the
two output layers' matmuls plus the logits path (``*_lm_head``), which is what it replaces, and
TRL GOLD's ``ULDLoss`` (benchmarks/peers.py ``gold_uld_loss``, ``gold_uld*``) with ``uld_loss``
from the same logits: ``gold_uld`` configured to compute its value (tests/test_benchmark_peers.py),
``gold_uld_aligned`` with GOLD's own alignment on synthetic byte offsets (:func:`byte_offsets`).
"""

import torch

import mlot_kernels
from benchmarks import peers
from benchmarks.steps import Impl, make_steps
from mlot_kernels.losses.answers import causal_lm_cross_entropy

IGNORE = -100


def _ce(student_logits, teacher_logits, student_labels, teacher_labels):
    return causal_lm_cross_entropy(student_logits, student_labels)


def _from_logits(method):
    def run(student_logits, teacher_logits, student_labels, teacher_labels):
        if method == "uld":
            return mlot_kernels.uld_loss(student_logits, teacher_logits, student_labels,
                                         teacher_labels)["loss"]
        return mlot_kernels.multi_level_ot_loss(student_logits, teacher_logits, student_labels,
                                                teacher_labels, preset=method)["loss"]
    return run


def _from_hidden(method):
    def run(s_hidden, s_weight, t_hidden, t_weight, student_labels, teacher_labels):
        if method == "uld":
            return mlot_kernels.uld_loss_from_hidden(s_hidden, s_weight, student_labels, t_hidden,
                                                     t_weight, teacher_labels)["loss"]
        return mlot_kernels.MultiLevelOTLoss(method).from_hidden(
            s_hidden, s_weight, student_labels, t_hidden, t_weight, teacher_labels)["loss"]
    return run


def _lm_head(method):
    logits_loss = _from_logits(method)

    def run(s_hidden, s_weight, t_hidden, t_weight, student_labels, teacher_labels):
        with torch.no_grad():
            teacher_logits = torch.nn.functional.linear(t_hidden, t_weight)
        student_logits = torch.nn.functional.linear(s_hidden, s_weight)
        return logits_loss(student_logits, teacher_logits, student_labels, teacher_labels)
    return run


IMPLS = {"ce": Impl(_ce, "causal_lm_cross_entropy(student_logits, labels): plain cross-entropy, "
                         "as Hugging Face computes it")}
for _method, _name in (("paper", "multi_level_ot_loss(preset='paper')"),
                       ("official", "multi_level_ot_loss(preset='official')"), ("uld", "uld_loss")):
    IMPLS[_method] = Impl(_from_logits(_method), f"{_name} from the logits")
    IMPLS[f"{_method}_hidden"] = Impl(_from_hidden(_method), f"{_name} from hidden states and "
                                      "output embeddings (the logits never built)")
    IMPLS[f"{_method}_lm_head"] = Impl(_lm_head(_method), "both models' output-layer matmuls "
                                       f"(the teacher's without gradient), then {_name} from "
                                       "those logits: what the hidden-state path replaces")

BASELINES = {impl: ("ce" if "_" not in impl else impl.replace("_hidden", "_lm_head"))
             for impl in IMPLS if impl != "ce" and not impl.endswith("_lm_head")}
HIDDEN = {impl for impl in IMPLS if impl.endswith(("_hidden", "_lm_head"))}


def _gold_uld(student_logits, teacher_logits, student_labels, teacher_labels):
    return peers.gold_uld_as_uld_loss(student_logits, teacher_logits, student_labels,
                                      teacher_labels)


def _gold_uld_aligned(student_logits, teacher_logits, student_labels, teacher_labels,
                      student_offsets, teacher_offsets):
    return peers.gold_uld_loss(student_logits, teacher_logits, student_labels, teacher_labels,
                               student_byte_offsets=student_offsets,
                               teacher_byte_offsets=teacher_offsets,
                               uld_crossentropy_weight=1.0, uld_distillation_weight=1.5)


# TRL GOLD's ULDLoss (TRL 1.16; benchmarks/peers.py gold_uld_loss), each against uld_loss
IMPLS["gold_uld"] = Impl(
    _gold_uld, "TRL GOLD's ULDLoss (trl.experimental.gold, TRL 1.16) configured as uld_loss "
    "(use_extended_uld=False, uld_token_merge_strategy='bayesian', no hybrid part, CE weight 1, "
    "distillation weight 1.5, temperature 1, neither EOS skipped): uld_loss's value "
    "(tests/test_benchmark_peers.py; to rounding in the logits' dtype, which GOLD does not upcast: "
    "bfloat16 on CUDA), computed in eager PyTorch, one sequence at a time: the "
    "softmax of every answer row over the full vocabulary, torch.sort, zero-padding to the larger "
    "vocabulary, L1; the cross-entropy over all the student's logits", needs=("trl",))
IMPLS["gold_uld_aligned"] = Impl(
    _gold_uld_aligned, "TRL GOLD's ULDLoss with GOLD's default alignment (use_extended_uld=True: "
    "the answers' byte offsets walked in Python into groups, split tokens merged by the "
    "'observed' strategy; both EOS skipped) and uld_loss's weights (CE 1, distillation 1.5), on "
    "synthetic byte offsets: the teacher's answer is the student's with teacher_answer - answer "
    "tokens split in two. Not uld_loss's value: 'observed' reads the logits at the answer tokens "
    "(each predicts the next one), not those that predict them, and the split tokens' rows are "
    "merged", needs=("trl",))
BASELINES.update(gold_uld="uld", gold_uld_aligned="uld")
OFFSETS = {"gold_uld_aligned"}  # implementations that take both models' byte offsets too


def make_case(batch=4, length=1024, v_student=32000, v_teacher=49152, hidden=1024, answer=300,
              teacher_answer=310, prompt=500, dtype="float32", seed=0, device="cpu"):
    return dict(batch=batch, length=length, v_student=v_student, v_teacher=v_teacher,
                hidden=hidden, answer=answer, teacher_answer=teacher_answer, prompt=prompt,
                dtype=dtype, seed=seed, device=str(device))


def named_cases(device, quick=False):
    """The case: on CPU B = 4, T = 1024, V 32000/49152, H = 1024, answers of 300 and 310 tokens,
    float32; on CUDA B = 8, T = 2048, V 32000/128256 (a Llama-3 teacher), H = 4096, answers of
    600 and 620 tokens, bfloat16."""
    if quick:
        return {"quick": make_case(2, 32, 300, 200, 16, 8, 9, 10, device=device)}
    if torch.device(device).type == "cuda":
        return {"T=2048": make_case(8, 2048, 32000, 128256, 4096, 600, 620, 1000, "bfloat16",
                                    device=device)}
    return {"T=1024": make_case(device=device)}


def _labels(gen, case, answer, vocab):
    labels = torch.full((case["batch"], case["length"]), IGNORE)
    labels[:, case["prompt"]:case["prompt"] + answer] = torch.randint(
        0, vocab, (case["batch"], answer), generator=gen)
    return labels


def make_inputs(case, hidden):
    """The student's inputs (requires_grad) and the teacher's, then both label tensors:
    (student_logits, teacher_logits, ...) or (student hidden, weight, teacher hidden, weight, ...)."""
    gen = torch.Generator().manual_seed(case["seed"])
    device, dtype = torch.device(case["device"]), getattr(torch, case["dtype"])
    batch, length, size = case["batch"], case["length"], case["hidden"]
    labels = (_labels(gen, case, case["answer"], case["v_student"]).to(device),
              _labels(gen, case, case["teacher_answer"], case["v_teacher"]).to(device))
    if not hidden:
        student = 3 * torch.randn(batch, length, case["v_student"], generator=gen)
        teacher = 3 * torch.randn(batch, length, case["v_teacher"], generator=gen)
        return (student.to(device, dtype).requires_grad_(), teacher.to(device, dtype), *labels)
    tensors = [torch.randn(batch, length, size, generator=gen),
               3 * torch.randn(case["v_student"], size, generator=gen) / size ** 0.5,
               torch.randn(batch, length, size, generator=gen),
               3 * torch.randn(case["v_teacher"], size, generator=gen) / size ** 0.5]
    s_hidden, s_weight, t_hidden, t_weight = (t.to(device, dtype) for t in tensors)
    return (s_hidden.requires_grad_(), s_weight.requires_grad_(), t_hidden, t_weight, *labels)


def byte_offsets(case):
    """Synthetic UTF-8 byte offsets [B, T, 2] (start, end) of both models' tokens, relative to the
    answer text, as GOLD's collators give them (prompt and padding positions (0, 0)): the
    student's ``answer`` tokens are 4 bytes each; the teacher's ``teacher_answer`` tokens are the
    student's with ``teacher_answer - answer`` of them (evenly spread, never the last) split into
    two tokens of 2 bytes. GOLD's alignment then pairs the other tokens one to one and each split
    token with its two halves. Returns (student offsets, teacher offsets)."""
    answer, extra = case["answer"], case["teacher_answer"] - case["answer"]
    if not 0 <= extra < answer:
        raise ValueError(f"byte_offsets: needs answer <= teacher_answer < 2 * answer, got "
                         f"{answer} and {case['teacher_answer']}")
    split = {(2 * k + 1) * (answer - 1) // (2 * extra) for k in range(extra)}
    widths = []
    for j in range(answer):
        widths += [2, 2] if j in split else [4]

    def offsets(token_widths):
        ends = torch.tensor(token_widths).cumsum(0)
        spans = torch.stack([ends - torch.tensor(token_widths), ends], 1)
        out = torch.zeros(case["batch"], case["length"], 2, dtype=torch.long)
        out[:, case["prompt"]:case["prompt"] + len(token_widths)] = spans
        return out.to(case["device"])

    return offsets([4] * answer), offsets(widths)


def make_case_steps(impl, case, impls=IMPLS):
    """:class:`benchmarks.steps.Steps` of ``impls[impl]`` on the case."""
    hidden = impl in HIDDEN
    inputs = make_inputs(case, hidden)
    if impl in OFFSETS:
        inputs = (*inputs, *byte_offsets(case))
    fn = impls[impl].run
    return make_steps(lambda: fn(*inputs), inputs[:2] if hidden else inputs[:1], case["device"])


def student_logits_mib(case):
    """The size of the student's logits [B, T, V_S] in MiB, in the case's dtype."""
    size = torch.empty((), dtype=getattr(torch, case["dtype"])).element_size()
    return case["batch"] * case["length"] * case["v_student"] * size / 2**20


def work(case):
    """No work model: no fractions of the ceilings."""
    return dict(flops=None, bytes=None)


def shape(case):
    dtype = "" if case["dtype"] == "float32" else f", {case['dtype']}"
    return (f"{case['batch']}×{case['length']}, V {case['v_student']}/{case['v_teacher']}, "
            f"H {case['hidden']}, answers {case['answer']}/{case['teacher_answer']}{dtype}")
