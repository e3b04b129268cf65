"""Hand-written kernels for the shapes that the stock PyTorch ops handle poorly (decode-shaped forwards).

Each backend is its own module, imported explicitly where it is used; this package imports nothing, so
that ``python -m magicdec.kernels.cpu build`` runs cleanly. `magicdec.kernels.cpu`: batch-invariant
CPU kernels (few-row linear layers, GQA attention of a few query tokens over a long KV cache; float32,
bfloat16 or float16 tensors, float32 arithmetic), built lazily from ``csrc/``. `decode_attention` (dense
caches), `paged_attention` (through block tables, with the guided draft's block scores) and `fused`:
Triton kernels for CUDA (any head dim).
"""
