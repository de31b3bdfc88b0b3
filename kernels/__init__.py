"""Custom GPU kernels (CUDA/Triton), each with a pure torch reference. None yet: the GPU path is a later issue."""
