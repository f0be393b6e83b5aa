"""Which kernel multiplies each layer, chosen by what this machine can do: the one table.

A model's matrices fall into four kinds (ROLES). For each class of CPU, TABLE names the kernel each kind
gets and why; `plan()` turns that into the choice for one model on this machine, falling back where a
measured check says a kernel is not exact or not there. `python -m llama_ref --explain-kernels` prints it.

The CPU class comes from the CPU's flags (cpu_class), capped by LLAMA_REF_CPU: `LLAMA_REF_CPU=avx2` runs an
AVX-512 machine as an AVX2 one, down to torch's, oneDNN's and fbgemm's own kernels (force_cpu_class), so
that every developer machine can measure the path most laptops take.

This module imports torch only inside the checks, so that forcing a class can happen before torch loads.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

from llama_ref.errors import LlamaRefError

# ------------------------------------------------------------------------------------------ the CPU

# x86 classes, least capable first; each needs all of its flags
X86_CLASSES = {
    "generic": frozenset(),
    "avx2": frozenset({"avx2", "fma"}),
    # int8 dot products that add into 32 bits (vpdpbusd): exact int8 products at full width
    "vnni": frozenset({"avx2", "fma", "avx512_vnni"}),
    "avx512-bf16": frozenset({"avx2", "fma", "avx512_vnni", "avx512_bf16"}),
}
CPU_CLASSES = (*X86_CLASSES, "arm64", "cuda", "mps")
FORCE_VARIABLE = "LLAMA_REF_CPU"
# What each forced x86 class tells torch's, oneDNN's and fbgemm's dispatchers (each reads its variable once,
# when it first dispatches: so before torch runs anything). fbgemm has no kernels below AVX2.
FORCED_ISA = {
    "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2"},
    "vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "FBGEMM_ENABLE_INSTRUCTIONS": "AVX512_E1"},
    "avx512-bf16": {},
}


@dataclass(frozen=True)
class Cpu:
    machine: str  # platform.machine(): x86_64, aarch64, arm64, ...
    flags: frozenset[str]
    forced: str | None = None  # a class to cap at (LLAMA_REF_CPU)

    @classmethod
    def from_flags(cls, machine: str, flags, forced: str | None = None) -> Cpu:
        flags = set(flags)
        if flags & {"avx_vnni", "amx_int8"}:  # the same exact int8 dot products as AVX512-VNNI's
            flags.add("avx512_vnni")
        if "amx_bf16" in flags:
            flags.add("avx512_bf16")
        return cls(machine, frozenset(flags), forced)

    def features(self) -> str:
        """The flags that decide the class, as a short readable list, e.g. 'avx2 fma, no avx512 vnni bf16'."""
        if self.machine not in ("x86_64", "AMD64", "i686"):
            return " ".join(sorted(self.flags & {"asimd", "asimddp", "i8mm", "bf16", "sve"})) or "no SIMD flags"
        shown = ["avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8"]
        have = [flag for flag in shown if flag in self.flags]
        lacking = [flag for flag in ("avx512f", "avx512_vnni", "avx512_bf16") if flag not in self.flags]
        text = " ".join(have) or "no AVX2"
        return f"{text}; no {' '.join(lacking)}" if lacking else text


def read_cpu() -> Cpu:
    """This machine's CPU: /proc/cpuinfo's flags (x86) or Features (Arm), and LLAMA_REF_CPU."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return Cpu.from_flags(platform.machine(), flags, os.environ.get(FORCE_VARIABLE) or None)


def cpu_class(cpu: Cpu) -> str:
    """The most capable class whose flags this CPU has, but no more than cpu.forced."""
    if cpu.machine in ("aarch64", "arm64"):
        return "arm64"
    if cpu.machine not in ("x86_64", "AMD64", "i686"):
        return "generic"
    found = "generic"
    for name, needs in X86_CLASSES.items():
        if needs <= cpu.flags:
            found = name
    if cpu.forced in X86_CLASSES:
        order = list(X86_CLASSES)
        found = order[min(order.index(found), order.index(cpu.forced))]
    return found


def check_forced_name(name: str | None) -> str | None:
    """A one-line problem with a LLAMA_REF_CPU value, or None."""
    if name and name not in X86_CLASSES:
        return (
            f"{FORCE_VARIABLE}={name} is not a CPU class; use one of {', '.join(X86_CLASSES)} "
            "(a class above this CPU's own has no effect)"
        )
    return None


def force_cpu_class(name: str | None = None) -> None:
    """Run as the CPU class `name` (default: LLAMA_REF_CPU): tell the dispatchers of torch, oneDNN and fbgemm
    to stay at or below its instruction sets. Only works before torch has run anything: llama_ref's
    __init__ calls it, and `python -m llama_ref --cpu CLASS` calls it before importing torch."""
    name = name or os.environ.get(FORCE_VARIABLE)
    if not name or check_forced_name(name):
        return
    os.environ[FORCE_VARIABLE] = name
    for variable, value in FORCED_ISA[name].items():
        os.environ.setdefault(variable, value)


# ------------------------------------------------------------------------------------------ the table

ROLES = {
    "linear": "attention and feed-forward projections of at least 2M weights (fused q/k/v and gate/up count once)",
    "small": "every matrix below that; the output too where no projection reaches it (a small model)",
    "output": "the output projection (one logit per vocabulary entry)",
    "embedding": "the token embedding table (rows looked up, never multiplied)",
}
# Below this many weights a projection is "small": int8 products' dozen small operations a call cost more than
# the bytes they save (benchmarks/results: SmolLM2-135M's and stories15M's decode were slower with them).
SMALL_WEIGHTS = 2**21


def role(name: str, weights: int, small_model: bool = False) -> str:
    """The role of the matrix `name` (a fused group: its module's name) of `weights` weights. In a small model
    (no projection reaches SMALL_WEIGHTS) the output is small too: its logits are a large share of the work
    of little else, and 8-bit activations lose them (SmolLM2-135M with a w7a8 output answered nothing)."""
    if weights < SMALL_WEIGHTS or (small_model and name == "output"):
        return "small"
    return name if name in ("output", "embedding") else "linear"


KERNELS = {
    "float": "the model's dtype throughout: torch's own matmul (the reference; the most memory)",
    "int8-weights": "int8 weights, one scale per row, times float activations (torch's _weight_int8pack_mm)",
    "bf16-blocked": "bf16 weights held in oneDNN's blocked layout; 4-bit copies of a GGUF's 4-bit weights for "
    "decode steps; small layers also keep int8 copies for one-row calls",
    "w8a8": "int8 weights times int8 activations rounded per token: exact integer products (fbgemm, and "
    "torch._int_mm for many rows)",
    "w7a8": "7-bit weights in int8 times int8 activations rounded per token (fbgemm): AVX2 adds pairs of u8 x s8 "
    "products in 16 bits, and 7-bit weights keep every pair inside them",
}


@dataclass(frozen=True)
class Choice:
    kernel: str
    why: str


def _row(linear: Choice, small: Choice, output: Choice, embedding: Choice) -> dict[str, Choice]:
    return {"linear": linear, "small": small, "output": output, "embedding": embedding}


_FEW_CALLS = Choice("float", "too small to gain: a quantized call's fixed cost is more than the bytes it saves")
_INT8_ROWS = Choice("int8-weights", "int8 rows, widened when looked up: a quarter of fp32's bytes, half of bf16's")
_FLOAT_DEVICE = Choice("float", "the device's own matmul in bf16 or fp16")
_NO_AVX2 = Choice("float", "no AVX2: torch's fp32 matmul is what this CPU runs best")

TABLE: dict[str, dict[str, Choice]] = {
    "avx512-bf16": _row(
        Choice("w8a8", "VNNI multiplies int8 at twice bf16's rate, from half the bytes"),
        Choice("bf16-blocked", "native bf16; oneDNN's layout costs no reorder per call"),
        Choice("bf16-blocked", "native bf16: the logits keep bf16's precision"),
        _INT8_ROWS,
    ),
    "vnni": _row(
        Choice("w8a8", "exact int8 products at a quarter of fp32's bytes"),
        _FEW_CALLS,
        Choice("w8a8", "fp32 would read 4 bytes a weight at every step"),
        _INT8_ROWS,
    ),
    "avx2": _row(
        Choice(
            "w7a8",
            "int8 products at full AVX2 speed, a quarter of fp32's bytes; 7-bit weights so that "
            "fbgemm's 16-bit pair sums cannot saturate",
        ),
        _FEW_CALLS,
        Choice("w7a8", "fp32 would read 4 bytes a weight at every step"),
        _INT8_ROWS,
    ),
    "arm64": _row(  # not measured by this project: no Arm host (benchmarks/results)
        Choice("int8-weights", "a quarter of fp32's bytes with a kernel torch builds for Arm"),
        _FEW_CALLS,
        Choice("int8-weights", "a quarter of fp32's bytes"),
        _INT8_ROWS,
    ),
    "generic": _row(_NO_AVX2, _NO_AVX2, _NO_AVX2, _INT8_ROWS),
    "cuda": _row(_FLOAT_DEVICE, _FLOAT_DEVICE, _FLOAT_DEVICE, Choice("float", "the device's dtype")),
    "mps": _row(_FLOAT_DEVICE, _FLOAT_DEVICE, _FLOAT_DEVICE, Choice("float", "the device's dtype")),
}

# --kernels: "auto" is the table's row; "float" and "int8-weights" apply to every layer; the three
# quantized-product kernels replace the row's choice for the large projections and the output
CHOICES = ("auto", "float", "int8-weights", "bf16-blocked", "w8a8", "w7a8")


class KernelError(LlamaRefError):
    """A kernel this machine or dtype cannot run; str() is one line with what to do instead."""


# ------------------------------------------------------------------------------------------ measured checks


@functools.cache
def int8_exact() -> bool:
    """Whether this CPU's int8 kernels add int8 products exactly (VNNI), checked once on numbers that would
    overflow a kernel that adds pairs of u8 * s8 products in 16 bits (AVX2 without VNNI)."""
    import torch

    from llama_ref.quantize import INT8_FEW_ROWS, Int8DotLinear

    if not (fbgemm_available() and hasattr(torch, "_int_mm")):
        return False
    try:
        layer = Int8DotLinear.from_float(torch.full((32, 64), 127.0), int_mm=True)
        x = torch.full((INT8_FEW_ROWS + 1, 64), 127.0)  # likewise: u8 255 in fbgemm
        exact = torch.full((INT8_FEW_ROWS + 1, 32), 64.0 * 127 * 127)
        return all(torch.equal(layer(x[:rows]), exact[:rows]) for rows in (1, INT8_FEW_ROWS + 1))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@functools.cache
def fbgemm_available() -> bool:
    """fbgemm's dynamic int8 linear is in this torch (x86 builds)."""
    import torch

    from llama_ref.quantize import FBGEMM_LINEAR

    return (
        "fbgemm" in torch.backends.quantized.supported_engines
        and FBGEMM_LINEAR is not None
        and hasattr(torch, "_make_per_channel_quantized_tensor")
    )


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN can hold bf16 weights in its blocked layout here (it needs AVX512BW/VL/DQ or
    AVX-NE-CONVERT, and says so only by failing)."""
    import torch

    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=torch.bfloat16), 1)
        return True
    except RuntimeError:
        return False


def available(kernel: str, device_type: str, dtype) -> str | None:
    """None if `kernel` runs on this device in this dtype, else why not, in a few words."""
    import torch

    if kernel in ("float", "int8-weights"):
        return None
    if device_type != "cpu":
        return f"it is a CPU kernel, and this is {device_type}"
    if kernel == "bf16-blocked":
        if dtype != torch.bfloat16:
            return "it holds bf16 weights (add --dtype bf16)"
        if not onednn_bf16():
            return "oneDNN has no bf16 on this CPU (it needs AVX512BW/VL/DQ or AVX-NE-CONVERT)"
        return None
    if not fbgemm_available():
        return "this torch build has no fbgemm (x86 builds have it)"
    if kernel == "w8a8" and not int8_exact():
        return "this CPU's int8 sums are not exact (no AVX512-VNNI, AVX-VNNI or AMX)"
    return None


# ------------------------------------------------------------------------------------------ the plan


@dataclass(frozen=True)
class Plan:
    cpu: str  # the class, e.g. "avx2"
    features: str  # the flags behind it
    choices: dict  # role -> Choice

    def kernel(self, role: str) -> str:
        return self.choices[role].kernel

    def quantized(self) -> bool:
        return any(choice.kernel != "float" for choice in self.choices.values())

    def summary(self) -> str:
        """One line: the class and each role's kernel."""
        roles = ", ".join(f"{role} {choice.kernel}" for role, choice in self.choices.items())
        return f"kernels for {self.cpu} ({self.features}): {roles}"

    def explain(self, counts: dict[str, tuple[int, int]] | None = None) -> str:
        """A table: each role's kernel, (its layers and weights where counts gives them,) and why."""
        lines = [
            f"CPU class {self.cpu}: {self.features}",
            "",
            f"{'role':<10} {'kernel':<13} {'layers':>6} {'weights':>9}  why",
        ]
        for role, choice in self.choices.items():
            layers, weights = (counts or {}).get(role, (0, 0))
            size = f"{layers:>6} {weights / 1e6:>8.1f}M" if counts is not None else f"{'':>6} {'':>9}"
            lines.append(f"{role:<10} {choice.kernel:<13} {size}  {choice.why}")
        lines += ["", *(f"{role}: {meaning}" for role, meaning in ROLES.items())]
        return "\n".join(lines)


def default_dtype(device_type: str, cpu: Cpu | None = None):
    """auto: bf16 on a GPU (fp16 on mps, whose bf16 support is partial) and on a CPU with native bf16 (the
    avx512-bf16 class, or Arm's BF16 extension), fp32 on other CPUs, where bf16 is emulated through fp32."""
    import torch

    if device_type == "cpu":
        cpu = cpu or read_cpu()
        native = cpu_class(cpu) == "avx512-bf16" or (cpu_class(cpu) == "arm64" and "bf16" in cpu.flags)
        return torch.bfloat16 if native else torch.float32
    return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device_type, torch.float32)


def plan(device_type: str, dtype, requested: str = "auto", cpu: Cpu | None = None, check=available) -> Plan:
    """Each role's kernel on this device, in this dtype, for --kernels `requested`. Raises KernelError for a
    requested kernel that cannot run here; for `auto`, a kernel whose measured check fails falls back
    (w8a8 to w7a8, then to float; bf16-blocked to float). `check(kernel, device_type, dtype)` is `available`,
    replaced in tests that fake a CPU."""
    if requested not in CHOICES:
        raise KernelError(f"unknown kernel '{requested}'; use one of {', '.join(CHOICES)}")
    cpu = cpu or read_cpu()
    name = cpu_class(cpu) if device_type == "cpu" else device_type
    features = cpu.features() if device_type == "cpu" else device_type
    row = dict(TABLE.get(name, TABLE["generic"]))
    if requested in ("float", "int8-weights"):
        reason = Choice(requested, f"--kernels {requested}")
        row = {role: reason for role in ROLES}
    elif requested != "auto":
        problem = check(requested, device_type, dtype)
        if not problem and requested in ("w7a8", "w8a8") and name == "generic":
            problem = "fbgemm's kernels need AVX2, and this CPU runs as the generic class"
        if problem:
            instead = " or w7a8" if requested == "w8a8" and not check("w7a8", device_type, dtype) else ""
            raise KernelError(f"--kernels {requested} cannot run here: {problem}; use --kernels auto{instead}")
        for role in ("linear", "output"):
            if row[role].kernel != "float" or role == "linear":
                row[role] = Choice(requested, f"--kernels {requested}")
    for role, choice in row.items():
        kernel = choice.kernel
        while check(kernel, device_type, dtype):
            fallback = {"w8a8": "w7a8", "w7a8": "float", "bf16-blocked": "float"}[kernel]
            choice = Choice(fallback, f"not {kernel}: {check(kernel, device_type, dtype)}")
            kernel = fallback
        if role == "embedding" and kernel not in ("float", "int8-weights"):
            choice = _INT8_ROWS
        row[role] = choice
    return Plan(name, features, row)
