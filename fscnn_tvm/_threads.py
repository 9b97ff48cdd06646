"""Thread-count set-up that must happen before TVM's runtime thread pool starts.

Seen on this project's 2-core KVM machines: without TVM_NUM_THREADS, TVM's pool decides on
1 thread, and its thread binding then squeezes PyTorch's own threads (PyTorch conv2d went from
1.1 ms to 32 ms in the same process). So we set both variables before tvm is imported,
unless the user already did.
"""
import os


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure(threads: int | None = None) -> int:
    """Set the TVM thread count (effective only before TVM's pool first runs)."""
    n = threads or int(os.environ.get("TVM_NUM_THREADS", 0)) or cores()
    os.environ["TVM_NUM_THREADS"] = str(n)
    os.environ.setdefault("TVM_BIND_THREADS", "0")
    return n
