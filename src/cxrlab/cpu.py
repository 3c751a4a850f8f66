"""What this CPU is and whether int8 is exact on it (for `cxrlab export --int8`).

benchmarks/throughput.py keeps its own stdlib copy of the name: the Keras baseline imports it
under TensorFlow, where importing cxrlab would change that process's allocator."""

from __future__ import annotations

import platform
from pathlib import Path


def _cpuinfo(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set((_cpuinfo("flags") or "").split())


def cpu_has_vnni() -> bool:
    """Whether ONNX Runtime multiplies uint8 by int8 without saturating: on x86 only with VNNI
    (without it, pairs of products are summed in 16 bits); ARM's dot products use 32 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return bool({"avx512_vnni", "avx_vnni"} & cpu_flags())
