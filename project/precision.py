"""CPU precision: bf16 autocast where the CPU has AMX, fp32 elsewhere. Emulated bf16 is slower than fp32, and so was
native AVX512-BF16 without AMX (an Intel Xeon, 6/207: bench/levers.py's bf16 row, BENCHMARKS.md)."""

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch.nn import Module

NATIVE_BF16 = ("avx512_bf16", "amx_bf16")
FASTER_BF16 = "amx_bf16"  # the native bf16 that bf16 autocast was measured faster than fp32 with


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU flags of ``cpuinfo`` that mean native bf16 arithmetic (none where the file is missing)."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [flag for flag in NATIVE_BF16 if flag in flags]


class CPUBf16WhereNative(MixedPrecision):
    """``bf16-mixed`` on a CPU with AMX (``amx_bf16``), ``32-true`` elsewhere; says which at start."""

    def __init__(self) -> None:
        super().__init__("bf16-mixed", "cpu")
        self.flags = native_bf16_flags()
        self.precision = "bf16-mixed" if FASTER_BF16 in self.flags else "32-true"
        self.said = False

    def convert_module(self, module: Module) -> Module:  # once the trainer runs with it: say which it is, and why
        if not self.said:
            found = f"this CPU has {', '.join(self.flags)}" if self.flags else f"no {' or '.join(NATIVE_BF16)} here"
            if self.flags and FASTER_BF16 not in self.flags:
                found += f" but no {FASTER_BF16}, where fp32 measured faster"
            rank_zero_info(f"Precision: {self.precision} ({found}; --trainer.precision sets another)")
            self.said = True
        return module

    def forward_context(self) -> AbstractContextManager:
        return super().forward_context() if self.precision == "bf16-mixed" else nullcontext()
