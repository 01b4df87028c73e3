"""aim-mlx side of benchmarks/vs_pytorch.py, in its own process: times the aim_mlx found in a
given source tree (this checkout, or an older commit's worktree for a before/after comparison).

Arguments: the source tree. Protocol: one command per line on stdin, "DTYPE BITS BATCH" (BITS 0:
not quantized) times one forward pass of aim-600M (all 24 blocks, random weights); one JSON
line out. Models are built once per (dtype, bits) and kept.
"""

import json
import sys
import time

sys.path.insert(0, sys.argv[1])

import aim_mlx  # noqa: E402  (first: it loads an optimized BLAS before mlx.core)

# isort: split
import mlx.core as mx  # noqa: E402

from aim_mlx import bench  # noqa: E402
from aim_mlx.models import preset_args  # noqa: E402


def main():
    print(json.dumps({"aim_mlx": aim_mlx.__file__, "mlx": mx.__version__}), flush=True)
    models, inputs = {}, {}
    for line in sys.stdin:
        dtype, bits, batch = line.split()
        bits, batch = int(bits), int(batch)
        if (dtype, bits) not in models:
            args = preset_args("aim-600M", head="last")
            models[dtype, bits] = bench.random_model(args, getattr(mx, dtype), bits or None)
        if batch not in inputs:
            inputs[batch] = mx.random.normal((batch, 3, 224, 224), key=mx.random.key(0))
            mx.eval(inputs[batch])
        start = time.perf_counter()
        mx.eval(models[dtype, bits](inputs[batch]))
        print(json.dumps({"seconds": time.perf_counter() - start}), flush=True)


if __name__ == "__main__":
    main()
