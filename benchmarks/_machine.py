"""The machine a benchmark ran on, for its first output line: timings mean little without it.

The classifier runs in bfloat16 only where oneDNN supports it on the CPU (AVX-512; native with AVX512-BF16
or AMX); elsewhere it runs in float32. The line says which.
"""

from __future__ import annotations

import os
import platform


def describe() -> str:
    """CPU model, cores, the vector extensions that matter for torch, the classifier's precision, torch version."""
    import torch

    from smearpipe.classify import _bf16_supported

    model, flags = platform.processor() or "unknown CPU", set()
    try:  # Linux; elsewhere the line names less
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    has = ",".join(f for f in wanted if f in flags) or "none of " + "/".join(wanted)
    precision = "bf16" if _bf16_supported() else "fp32"
    return (f"machine: {model}, {os.cpu_count()} cores, {has}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); classifier precision here: {precision}")
