"""Torch sparse CSR tensors from CSR arrays (for ``A @ X`` products that use all cores)."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["torch_csr"]


def torch_csr(
    matrix: sp.csr_matrix | sp.csr_array, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``matrix`` as a torch sparse CSR tensor on the CPU, with int64 indices (torch's CPU
    product with a dense matrix is faster with them; int64 index arrays are shared, not copied).
    The caller gives a well-formed CSR (scipy's own): invariants are not checked again, and
    torch's "CSR support is in beta" warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(matrix.indptr.astype(np.int64, copy=False)),
            torch.from_numpy(matrix.indices.astype(np.int64, copy=False)),
            torch.from_numpy(np.asarray(matrix.data)).to(dtype),
            size=matrix.shape,
            check_invariants=False,
        )
