"""fscnn-tvm: fine-grained sparse CNN inference on CPUs, compiled with TVM."""
from . import _threads

_threads.configure()  # before tvm is imported anywhere: see _threads.py

# pylint: disable=wrong-import-position
from .formats import BSR, CSR, to_bsr, to_csr
from .importer import ImportedModel, import_torch
from .layer import DenseConvLayer, SparseLayer, dense_conv2d, sparse_conv2d, sparse_linear
from .runtime import CompiledModel, compile, load  # noqa: A004 - compile is the public name
from .target import resolve_target


def tune(imported, **kwargs):
    """``fscnn_tvm.tuning.tune``; imported on first use (meta_schedule is slow to import)."""
    from .tuning import tune as _tune
    return _tune(imported, **kwargs)


__all__ = ["BSR", "CSR", "to_bsr", "to_csr", "SparseLayer", "sparse_conv2d", "sparse_linear", "DenseConvLayer", "dense_conv2d", "resolve_target",
           "ImportedModel", "import_torch", "CompiledModel", "compile", "load", "tune"]
__version__ = "0.1.0"
