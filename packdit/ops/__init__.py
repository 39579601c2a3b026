"""The kernels, one op per file: Triton (``attention``, ``modulate``, ``gated_residual``, ``mlp``) and the CUDA
kernels of the native extension ``packdit._C`` (``patchify``).

Each op is a ``torch.library`` custom op (``torch.ops.packdit.*``) with a fake implementation and autograd.
It runs where its kernel can -- CUDA tensors, or for Triton CPU tensors under ``TRITON_INTERPRET=1`` -- and
elsewhere raises saying why; it has no fallback of its own. The choice between a kernel and its PyTorch
oracle in :mod:`packdit.reference` is made per call by the dispatcher, :mod:`packdit.nn.functional`
(docs/architecture.md).
"""
