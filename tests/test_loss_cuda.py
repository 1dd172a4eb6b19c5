"""The whole losses on CUDA tensors (the Triton topk_probs kernels, ULD's chunked torch.sort
kernels, the hidden-state ops' chunked matmuls), both paths, against the same losses on CPU:
every term and every gradient. Skipped without a CUDA GPU, and under the Triton interpreter."""

import os

import pytest
import torch

import mlot_kernels
from tests.conftest import assert_close_rel
from tests.loss_oracles import make_batch, make_hidden_batch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="the Triton interpreter is on: kernels are not compiled"),
]

METHODS = ["paper", "official", "uld"]
# (student answer lengths, teacher answer lengths, V_S, V_T): one vocabulary over several
# column chunks, one below k
BATCHES = [([40, 17, 0, 33], [35, 22, 9, 30], 3000, 5000), ([6, 9], [8, 5], 40, 30)]


def logits_loss(method, *tensors):
    if method == "uld":
        return mlot_kernels.uld_loss(*tensors)
    return mlot_kernels.multi_level_ot_loss(*tensors, preset=method)


def hidden_loss(method, student, teacher, s_labels, t_labels):
    if method == "uld":
        return mlot_kernels.uld_loss_from_hidden(student[0], student[1], s_labels, teacher[0],
                                                 teacher[1], t_labels, student_bias=student[2],
                                                 teacher_bias=teacher[2])
    return mlot_kernels.MultiLevelOTLoss(method).from_hidden(
        student[0], student[1], s_labels, teacher[0], teacher[1], t_labels,
        student_bias=student[2], teacher_bias=teacher[2])


def on(device, tensors):
    return [t.detach().to(device).requires_grad_(t.is_floating_point()) for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("batch", BATCHES, ids=["chunks", "small-vocab"])
def test_logits_path_on_cuda_equals_cpu(gen, batch, method, dtype):
    tensors = make_batch(gen, *batch, dtype=dtype)
    results = {}
    for device in ("cpu", "cuda"):
        s_logits, t_logits, s_labels, t_labels = on(device, tensors)
        out = logits_loss(method, s_logits, t_logits, s_labels, t_labels)
        grads = torch.autograd.grad(out["loss"], (s_logits, t_logits))
        results[device] = ({k: v.detach().cpu() for k, v in out.items()}, [g.cpu() for g in grads])
    (cuda_out, cuda_grads), (cpu_out, cpu_grads) = results["cuda"], results["cpu"]
    for key, value in cpu_out.items():
        assert_close_rel(cuda_out[key], value, 1e-5)
    for a, e in zip(cuda_grads, cpu_grads):
        assert a.dtype == dtype
        assert_close_rel(a.float(), e.float(), 1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("method", METHODS)
def test_hidden_path_on_cuda_equals_cpu(gen, method):
    student, teacher, s_labels, t_labels = make_hidden_batch(gen, *BATCHES[0], size=64,
                                                             dtype=torch.float32)
    results = {}
    for device in ("cpu", "cuda"):
        s, t = on(device, student), on(device, teacher)
        out = hidden_loss(method, s, t, s_labels.to(device), t_labels.to(device))
        grads = torch.autograd.grad(out["loss"], s + t)
        results[device] = ({k: v.detach().cpu() for k, v in out.items()}, [g.cpu() for g in grads])
    (cuda_out, cuda_grads), (cpu_out, cpu_grads) = results["cuda"], results["cpu"]
    for key, value in cpu_out.items():
        assert_close_rel(cuda_out[key], value, 1e-5)
    for a, e in zip(cuda_grads, cpu_grads):
        assert_close_rel(a, e, 1e-4)  # GPU matmuls sum in another order (TF32 off by default)
