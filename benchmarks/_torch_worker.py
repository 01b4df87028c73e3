"""PyTorch side of benchmarks/vs_pytorch.py: runs in a separate venv that has torch and timm.

timm's VisionTransformer shaped as aim-600M's trunk (embed 1536, depth 24, 12 heads, patch 14,
no class token, no biases in qkv, proj, fc1, fc2), float32, eval mode, inference mode.
Protocol: one command per line on stdin, "B" times one forward pass at batch B; one JSON line out.
Arguments: thread count, device ("cpu", or "mps" on Apple silicon).
"""

import json
import sys
import time

import timm
import torch
from _timm_aim import build


def main():
    threads, device = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    model = build(1536, 24, 12, device=device)
    params = sum(p.numel() for p in model.parameters())
    info = {
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "params": params,
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "device": device,
    }
    print(json.dumps(info), flush=True)
    inputs = {}
    for line in sys.stdin:
        b = int(line)
        if b not in inputs:
            x = torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(0))
            inputs[b] = x.to(device)
        with torch.inference_mode():
            start = time.perf_counter()
            model(inputs[b]).sum().item()  # .item() waits for an asynchronous device
            seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds}), flush=True)


if __name__ == "__main__":
    main()
