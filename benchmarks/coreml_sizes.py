"""Weight-file size of each official model's Core ML export, by compression, against the
Neural Engine's 2 GiB limit. Computed from the architecture (checked against the parameter
counts of SPEC section 1), not measured; `coreml_export.py` measures aim-600M.

    python benchmarks/coreml_sizes.py
"""

from __future__ import annotations

from aim_mlx.export.coreml import ANE_WEIGHT_LIMIT, PALETTE_GROUP_SIZE
from aim_mlx.models import PRESETS, preset_args

SPEC_PARAMS = {  # SPEC section 1, "params (with head)"
    "aim-600M": 686_794_752,
    "aim-1B": 1_219_813_376,
    "aim-3B": 2_741_981_184,
    "aim-7B": 6_483_066_880,
}


def counts(args, blocks: int) -> tuple[int, int, int]:
    """(compressible weights, their output channels, other stored values) of an export that
    runs `blocks` blocks: linear and conv weights are compressed; the rest stays float16."""
    D, p, C = args.embed_dim, args.patch_size, args.num_classes
    n = (args.img_size // p) ** 2
    weights = 3 * p * p * D + blocks * 12 * D * D + 2 * D * D + C * D
    channels = D + blocks * 9 * D + 2 * D + C  # rows of the conv / linear weights
    # conv bias, layer norms, position embedding, head norm (scale, shift), class token,
    # and the zero bias Core ML's linear op carries (one per output channel)
    other = D + 2 * D * (1 + 2 * blocks) + n * D + 2 * D + D + channels - D
    return weights, channels, other


def total_params(args) -> int:
    """The checkpoint's parameter count (all blocks, post-trunk norm, BN statistics)."""
    D, p, C, B = args.embed_dim, args.patch_size, args.num_classes, args.num_blocks
    return 3 * p * p * D + D + 2 * D + B * (12 * D * D + 4 * D) + 2 * D + 3 * D + 2 * D * D + C * D


def size(args, blocks: int, compress: str, target: str = "iOS18") -> int:
    w, ch, other = counts(args, blocks)
    base = 2 * other
    if compress == "float16":
        return base + 2 * w
    if compress == "int8":
        return base + w + 2 * ch  # one float16 scale per output channel
    bits = int(compress.removeprefix("palettize"))
    if target == "iOS18":  # one table per 16 output channels
        C = args.num_classes
        if C % PALETTE_GROUP_SIZE:  # head.linear cannot be grouped: it stays float16
            w, ch, base = w - C * args.embed_dim, ch - C, base + 2 * C * args.embed_dim
        tables = ch // PALETTE_GROUP_SIZE
    else:  # one table per tensor: the convolution and 6 linear layers a block, 3 in the head
        tables = 1 + 6 * blocks + 3
    return base + w * bits // 8 + tables * 2**bits * 2


def main():
    kinds = ["float16", "int8", "palettize6", "palettize4"]
    print(f"weight file (GiB), iOS18 grouping; limit {ANE_WEIGHT_LIMIT / 2**30:g} GiB; * = over\n")
    print("| model | head (blocks run) | " + " | ".join(kinds) + " |")
    print("| --- | --- |" + " --- |" * len(kinds))
    for name in PRESETS:
        assert total_params(preset_args(name)) == SPEC_PARAMS[name], name
        for head in ("best", "last"):
            args = preset_args(name, head=head)
            blocks = max(args.probe_layers) + 1
            cells = []
            for k in kinds:
                s = size(args, blocks, k)
                cells.append(f"{s / 2**30:.2f}{'*' if s > ANE_WEIGHT_LIMIT else ''}")
            print(f"| {name} | {head} ({blocks}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
