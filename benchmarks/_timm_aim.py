"""timm's VisionTransformer shaped as an AIM trunk, for the PyTorch side of the benchmarks
(`_torch_worker.py`, `_torch_gpu_worker.py`): patch 14, MLP ratio 4, no class token, no biases
in qkv, proj, fc1 and fc2, layer norms with eps 1e-6; average pooling and a linear head in place
of AIM's attention-pooling head. Float32 weights, eval mode."""

from functools import partial

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer


def build(embed_dim: int, depth: int, num_heads: int, img_size: int = 224, device="cpu"):
    with torch.device(device):
        return VisionTransformer(
            img_size=img_size,
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
