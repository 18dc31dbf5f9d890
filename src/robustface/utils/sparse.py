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
    """``matrix`` as a torch sparse CSR tensor on the CPU, sharing the index arrays where their
    dtype allows. The caller gives a well-formed CSR (scipy's own); invariants are not checked
    again, and torch's "CSR support is in beta" warning is silenced."""
    indptr, indices = matrix.indptr, matrix.indices
    if indptr.dtype != indices.dtype:
        indptr, indices = indptr.astype(np.int64), indices.astype(np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr),
            torch.from_numpy(indices),
            torch.from_numpy(np.asarray(matrix.data)).to(dtype),
            size=matrix.shape,
            check_invariants=False,
        )
