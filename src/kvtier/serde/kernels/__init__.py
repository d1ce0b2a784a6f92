"""numba kernels behind the built-in serdes; they release the GIL and write into the caller's arrays."""
