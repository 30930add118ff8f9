"""CPU precision: bf16 autocast where bf16 is native (AVX512-BF16, AMX), fp32 where emulated bf16 is slower."""

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info
from torch.nn import Module

NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def native_bf16_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """The CPU flags of ``cpuinfo`` that mean native bf16 arithmetic (none where the file is missing)."""
    try:
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return [flag for flag in NATIVE_BF16 if flag in flags]


class CPUBf16WhereNative(MixedPrecision):
    """``bf16-mixed`` on a CPU with native bf16, ``32-true`` elsewhere; says which at start."""

    def __init__(self) -> None:
        super().__init__("bf16-mixed", "cpu")
        self.flags = native_bf16_flags()
        self.precision = "bf16-mixed" if self.flags else "32-true"
        self.said = False

    def convert_module(self, module: Module) -> Module:  # once the trainer runs with it: say which it is, and why
        if not self.said:
            found = f"this CPU has {', '.join(self.flags)}" if self.flags else f"no {' or '.join(NATIVE_BF16)} here"
            rank_zero_info(f"Precision: {self.precision} ({found}; --trainer.precision sets another)")
            self.said = True
        return module

    def forward_context(self) -> AbstractContextManager:
        return super().forward_context() if self.precision == "bf16-mixed" else nullcontext()
