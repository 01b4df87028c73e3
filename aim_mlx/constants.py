"""Constants used in several modules: one source for each. (No MLX import here: aim_mlx loads a
BLAS before anything imports mlx.core.)"""

# Weight dtypes a model can be converted to and run in, and their bytes per element.
DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# Byte units: GB (10^9) for files and disk space, as the hub and file managers count them;
# GiB (2^30) for memory, as MLX's and PyTorch's peak-memory figures are usually quoted.
GB = 10**9
GiB = 2**30

# Upstream's evaluation transform: the shorter side resized to ceil(size / CROP_RATIO) (bicubic),
# a center crop of size, then the ImageNet mean / std per RGB channel.
CROP_RATIO = 0.875
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
