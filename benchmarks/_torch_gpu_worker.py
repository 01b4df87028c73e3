"""PyTorch side of benchmarks/vs_pytorch_gpu.py, in a process of its own (no MLX in it).

timm's VisionTransformer shaped as an AIM trunk (patch 14, MLP ratio 4, no class token, no
biases in qkv, proj, fc1, fc2; average pooling + linear head), float32 weights, inference mode,
`torch.autocast` to the requested dtype. Argument: the device ("auto": cuda, else mps, else
none; or "cpu"). Protocol: one JSON line of information first; then per JSON request on stdin
({embed_dim, depth, num_heads, img_size, batch, dtype, warmup, iters}) one JSON answer
({images_per_s, peak_memory_gb} or {error}).
"""

import gc
import json
import sys
import time

import timm
import torch
from _timm_aim import build


def pick(device: str) -> str:
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "none"


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()


def measure(model, req: dict, device: str) -> dict:
    size, batch = req["img_size"], req["batch"]
    x = torch.randn(batch, 3, size, size, device=device)
    dtype = getattr(torch, req["dtype"])

    def step():
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype):
            return model(x)

    for _ in range(req["warmup"]):
        step()
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(req["iters"]):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {"images_per_s": batch * len(times) / sum(times), "peak_memory_gb": peak}


def main():
    device = pick(sys.argv[1])
    info = {"torch": torch.__version__, "timm": timm.__version__, "device": device}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info), flush=True)
    if device == "none":
        return
    torch.manual_seed(0)
    model, shape = None, None
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["embed_dim"], req["depth"], req["num_heads"], req["img_size"])
        try:
            if key != shape:
                model, shape = None, None
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                model, shape = build(*key, device), key
            out = measure(model, req, device)
        except Exception as e:  # out of memory at one size: say so, go on with the next
            model, shape = None, None
            out = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
