"""The torch.ops.mlot operators: their registration (the compiled library, fake kernels,
autograd), their CUDA kernels (Triton) and their plain PyTorch references."""
