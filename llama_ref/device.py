"""Where the model runs and in what precision, and whether it fits there before anything is allocated.

The upstream reference hard-codes CUDA and finds out about memory by running out of it; here the
choice is explicit and a model that can't fit is refused with the ways out named.
"""

from __future__ import annotations

import torch

from llama_ref.errors import LlamaRefError

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


class DeviceError(LlamaRefError):
    """A device or memory problem the user can fix; str() is one line with what to do."""


def pick_device(requested: str | None = None) -> torch.device:
    """auto (None or "auto") tries cuda, then mps, then cpu."""
    if requested in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device '{requested}' requested but this torch has no usable CUDA; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"device '{requested}' does not exist: {torch.cuda.device_count()} CUDA device(s) found")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"device '{requested}' requested but MPS is not available; use --device cpu")
    return device


def pick_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """auto: kernels.default_dtype (bf16 where the device computes it natively, else fp32; fp16 on mps)."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "auto"):
        from llama_ref.kernels import default_dtype

        return default_dtype(device.type)
    if requested not in DTYPES:
        raise DeviceError(f"unknown dtype '{requested}'; use auto, fp32, bf16 or fp16")
    return DTYPES[requested]


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`, or None where we can't tell."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as meminfo:
                for line in meminfo:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def check_fits(weight_bytes: int, cache_bytes: int, device: torch.device, *, quantized: bool) -> None:
    """Refuse, before allocating, a model plus KV cache that would exhaust the device's memory."""
    available = free_memory(device)
    # activations, the rotary table and allocator slack need room too
    needed = int((weight_bytes + cache_bytes) * 1.1) + (256 << 20)
    if available is None or needed <= available:
        return
    ways_out = [f"a smaller --max-seq-len or batch size (the KV cache needs {cache_bytes / 2**30:.2f} GiB)"]
    if not quantized:
        ways_out.append("--kernels int8-weights")
    if device.type != "cpu":
        ways_out.append("--device cpu")
    raise DeviceError(
        f"not enough memory on {device}: the weights need {weight_bytes / 2**30:.2f} GiB and the KV cache "
        f"{cache_bytes / 2**30:.2f} GiB, but only {available / 2**30:.2f} GiB is free; try " + ", or ".join(ways_out)
    )
