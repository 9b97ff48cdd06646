"""fscnn-tvm: fine-grained sparse CNN inference on CPUs, compiled with TVM."""
from . import _threads

_threads.configure()  # before tvm is imported anywhere: see _threads.py

# pylint: disable=wrong-import-position
from .formats import BSR, CSR, to_bsr, to_csr
from .ops import SparseLayer, sparse_conv2d, sparse_linear
from .target import resolve_target

__all__ = ["BSR", "CSR", "to_bsr", "to_csr", "SparseLayer", "sparse_conv2d", "sparse_linear", "resolve_target"]
__version__ = "0.1.0"
