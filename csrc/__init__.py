"""tandem.csrc: the CUDA C++ sources of the ops that Triton does not match, shipped with the package and JIT-built
on first use by tandem.kernels.csrc (see README.md here)."""
