"""What every benchmark needs from the device: timing, memory, errors, the card's ceilings and versions.

Timing is CUDA events on a GPU (no host sync inside what is timed) and the host clock on CPU. Each benchmark
writes its JSON with zebra.utils.files.write_json_atomic, the long ones after every measurement, so that a run
cut short by a time limit still leaves what it measured. Nothing is asserted on speed: numbers are printed and saved.
"""

from __future__ import annotations

import gc
import importlib.metadata
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

GIB = 2 ** 30


class Device:
    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.cuda else None

    def reset_peak(self):
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else None

    def free(self, collect: bool = False):
        """Return cached blocks to the driver; `collect` also runs the garbage collector first (after an
        exception, whose traceback frames can keep tensors alive in reference cycles)."""
        if collect:
            gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def time(self, fn) -> float:
        """Seconds of fn() (CUDA events on GPU)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def name(self) -> str:
        return torch.cuda.get_device_name(self.device) if self.cuda else "cpu"

    def total_memory_gib(self) -> float | None:
        return torch.cuda.get_device_properties(self.device).total_memory / GIB if self.cuda else None


class PhaseTimer:
    """Marks on the CUDA stream (events: no host sync while the step runs) or host clock on CPU. A phase's
    time runs from the previous mark to its own."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list = []

    def mark(self, name: str) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append((name, ev))
        else:
            self.marks.append((name, time.perf_counter()))

    def phases(self) -> dict:
        """{phase: ms}."""
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = {}
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


class NoTimer:
    def mark(self, name):
        pass


# ------------------------------------------------------------------------------------------------ errors
def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e)
    return "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


# CUDA errors that leave the context unusable: every later kernel of the process fails with them too
STICKY_CUDA_ERRORS = ("illegal memory access", "misaligned address", "unspecified launch failure",
                      "device-side assert", "CUBLAS_STATUS_EXECUTION_FAILED", "illegal instruction")


class DeviceBroken(RuntimeError):
    """A sticky CUDA error: the benchmark stops (what was measured is saved) instead of recording the same error
    for every later measurement."""


def is_sticky(e: BaseException) -> bool:
    return not is_oom(e) and any(m.lower() in str(e).lower() for m in STICKY_CUDA_ERRORS)


def raise_if_sticky(e: BaseException, where: str) -> None:
    if is_sticky(e):
        raise DeviceBroken(f"{where}: {type(e).__name__}: {str(e)[:300]}") from e


def release(dev: Device, step, collect: bool) -> None:
    """Frees what a measurement held (`step`: anything with `close()`, or None). After a sticky CUDA error these
    calls fail as well: that failure must not replace the error being raised (the next device call reports it)."""
    try:
        if step is not None:
            step.close()
        dev.free(collect=collect)
    except Exception as e:
        if not is_sticky(e):
            raise


def count_host_syncs(fn, device) -> dict:
    """Runs `fn` once under torch.cuda.set_sync_debug_mode("warn") and returns how many synchronising calls it
    made and from where (file:line of the Python caller). CUDA only."""
    if torch.device(device).type != "cuda":
        return {"count": None, "note": "CUDA only"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where: dict[str, int] = {}
    for w in syncs:
        key = f"{Path(w.filename).name}:{w.lineno}"
        where[key] = where.get(key, 0) + 1
    return {"count": len(syncs), "where": where}


# ------------------------------------------------------------------------------------------------ ceilings
def copy_bandwidth(dev: Device, mib: int, iters: int = 10) -> dict:
    """Device-to-device copy bandwidth: 2 x bytes / time of dst.copy_(src) (read + write), median. The
    memory roofline of a decode step."""
    n = mib * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device=dev.device).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    dev.sync()
    times = [dev.time(lambda: dst.copy_(src)) for _ in range(iters)]
    src = dst = None
    dev.free()
    t = statistics.median(times)
    return {"bytes": n, "seconds": t, "bytes_per_s": 2 * n / t, "GBps": 2 * n / t / 1e9}


def matmul_rate(device, smoke: bool) -> dict:
    """Best dense matmul rate of the card (bf16 on CUDA, fp32 on CPU): square GEMMs, best of several timed
    repeats per size. The compute ceiling that MFU is measured against."""
    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = (256,) if smoke else ((4096, 8192, 16384) if cuda else (1024, 2048))
    repeats, iters = (2, 2) if smoke else (5, 10)
    out = {"dtype": str(dtype).replace("torch.", ""), "per_size_tflops": {}}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        best = 0.0
        for _ in range(repeats):
            timer = PhaseTimer(device)
            timer.mark("start")
            for _ in range(iters):
                a @ b
            timer.mark("mm")
            ms = timer.phases()["mm"]
            best = max(best, 2.0 * n ** 3 * iters / (ms / 1e3))
        out["per_size_tflops"][str(n)] = best / 1e12
        del a, b
    out["tflops"] = max(out["per_size_tflops"].values())
    out["flops_per_s"] = out["tflops"] * 1e12
    Device(device).free(collect=True)
    return out


# ------------------------------------------------------------------------------------------------ record
def package_version(name: str) -> str | None:
    for candidate in (name, name.replace("_", "-"), name.replace("-", "_")):
        try:
            return importlib.metadata.version(candidate)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def versions(*packages: str) -> dict:
    """Python, torch and CUDA versions, then each named package's installed version (None when absent)."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    out.update({p: package_version(p) for p in packages})
    return out


def ints(s) -> list[int]:
    """"1024,4096" -> [1024, 4096]."""
    return [int(x) for x in str(s).split(",") if x.strip()]
