"""Optional Triton kernels for CUDA GPUs. Each module imports triton at the top, so import it
only where Triton is available; every kernel has a plain-PyTorch reference and a GPU test."""
