"""Classifier training speed: seconds per optimisation step of the shipped architecture, float32 vs bf16 autocast.

Usage: python benchmarks/bench_train_step.py [--input-size 64] [--batch 32] [--steps 6] [--device cpu]

One step is what ``train_classifier`` does per batch once the batch is augmented: forward, cross-entropy,
backward and an AdamW step of VGG16-BN with the 256-unit head, channels-last, on random tensors (so data
loading and augmentation are not counted). bf16 is timed only where the device supports it (on a CPU,
oneDNN's bf16 support, which needs AVX-512; elsewhere autocast falls back to far slower kernels).
Multiply by the steps per epoch (training crops / batch) for an epoch's network time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _machine import describe

from smearpipe.classify import build_vgg16
from smearpipe.train import _training_device, bf16_available


def step_seconds(device: torch.device, *, bf16: bool, input_size: int, batch: int, steps: int) -> float:
    torch.manual_seed(0)
    model = build_vgg16(5).to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, input_size, input_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 5, (batch,), device=device)
    times = []
    for _ in range(steps + 1):  # the first step warms up (allocations, kernel choice) and is not counted
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(describe())
    device = _training_device(args.device)
    bf16_ok = bf16_available(device)
    kw = {"input_size": args.input_size, "batch": args.batch, "steps": args.steps}
    fp32 = step_seconds(device, bf16=False, **kw)
    print(f"{device}, {args.input_size} px, batch {args.batch}: float32 {fp32:.3f} s per step (median of {args.steps})")
    if bf16_ok:
        bf = step_seconds(device, bf16=True, **kw)
        print(f"{device}, {args.input_size} px, batch {args.batch}: bf16 autocast {bf:.3f} s per step, "
              f"ratio float32/bf16 {fp32 / bf:.2f}")
    else:
        print(f"bf16 autocast: not supported on {device} here, not timed")


if __name__ == "__main__":
    main()
