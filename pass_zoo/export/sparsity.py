"""What an unstructured export holds: its measured density and what its zeros save once compressed.

A dense ``model.safetensors`` full of zeros is as large as the dense one; the zeros pay off only
in a compressed or sparse format. The report reads the written file (not the model in memory), so
it describes exactly what a user downloads:

* ``density`` / ``density_per_layer`` -- nonzero fraction of the prunable weights, overall and per layer;
* ``model_bytes`` -- the safetensors file as written;
* ``model_zip_bytes`` -- the same file deflated (zlib level 9, what a zip archive of it would hold);
* ``weights_nonzero`` / ``model_csr_bytes`` -- nonzeros of every tensor, and the size of the weights
  with each prunable layer stored as CSR (float32 values, int32 column indices, int32 row pointers
  over its output rows) and everything else dense.
"""
from __future__ import annotations

import zlib
from pathlib import Path
from typing import Dict, List

import torch


def _deflated_size(path: Path, chunk: int = 1 << 22) -> int:
    z = zlib.compressobj(9)
    size = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            size += len(z.compress(block))
    return size + len(z.flush())


def _csr_bytes(t: torch.Tensor) -> int:
    rows = t.shape[0] if t.dim() > 1 else 1
    nnz = int(torch.count_nonzero(t))
    return nnz * (t.element_size() + 4) + (rows + 1) * 4


def sparsity_report(path, masked: List[str], prefix: str = "") -> Dict:
    """Density and compressed sizes of the safetensors file ``path``; ``masked`` names the prunable
    weights (``prefix`` + name is their key in the file)."""
    from safetensors.torch import load_file

    path = Path(path)
    tensors = load_file(str(path))
    keys = {prefix + n for n in masked}
    per_layer, kept, total = {}, 0, 0
    nonzero, csr = 0, 0
    for key, t in tensors.items():
        nz = int(torch.count_nonzero(t))
        nonzero += nz
        if key in keys:
            per_layer[key[len(prefix):]] = nz / max(1, t.numel())
            kept, total = kept + nz, total + t.numel()
            csr += _csr_bytes(t)
        else:
            csr += t.numel() * t.element_size()
    return {"density": kept / max(1, total), "density_per_layer": {n: per_layer[n] for n in masked},
            "prunable_weights": total, "weights_nonzero": nonzero,
            "model_bytes": path.stat().st_size, "model_zip_bytes": _deflated_size(path), "model_csr_bytes": csr}
