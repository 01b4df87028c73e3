"""PyTorch side of benchmarks/vs_pytorch.py: runs in a separate venv that has torch and timm.

timm's VisionTransformer shaped as aim-600M's trunk (embed 1536, depth 24, 12 heads, patch 14,
no class token, no biases in qkv, proj, fc1, fc2), float32, eval mode, inference mode.
Protocol: one command per line on stdin, "B" times one forward pass at batch B; one JSON line out.
Arguments: thread count, device ("cpu", or "mps" on Apple silicon).
"""

import json
import sys
import time
from functools import partial

import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer


def build(embed_dim, depth, num_heads):
    return VisionTransformer(
        img_size=224,
        patch_size=14,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4,
        qkv_bias=False,
        proj_bias=False,
        mlp_layer=partial(Mlp, bias=False),
        class_token=False,
        no_embed_class=True,
        global_pool="avg",
        fc_norm=False,
        final_norm=False,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=1000,
    ).eval()


def main():
    threads, device = int(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(threads)
    model = build(1536, 24, 12).to(device)
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
