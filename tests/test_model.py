"""The MLX model against the official PyTorch outputs, through the real convert -> load path."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import (
    FIXTURE_CONFIG,
    REF,
    build_reference_model,
    float32_bound,
    pending_operations,
    rel_err,
    to_np,
)

import aim_mlx
from aim_mlx.convert import convert
from aim_mlx.models import AIM, PRESETS, ModelArgs, ops, preset_args, sincos_pos_embed

INPUTS = {"input.npy": "", "input_252x196.npy": "_252x196"}


def logits(model, input_name):
    return np.array(model(mx.array(np.load(REF / input_name))))


@pytest.mark.parametrize("input_name", INPUTS)
def test_float32_logits_match_reference(converted, variant, input_name):
    model = aim_mlx.load(converted[variant, "float32"])
    ref = np.load(REF / f"logits_{variant}{INPUTS[input_name]}.npy")
    out = logits(model, input_name)
    assert out.shape == ref.shape and out.dtype == np.float32
    assert rel_err(out, ref) < float32_bound(1e-4)


def test_block_features_match_reference(converted, variant):
    model = aim_mlx.load(converted[variant, "float32"])
    ref = np.load(REF / f"features_{variant}.npy")  # (blocks, 1, 256, 64)
    feats = model.extract_features(mx.array(np.load(REF / "input.npy")[:1]))
    assert (
        len(feats) == ref.shape[0] == max(FIXTURE_CONFIG["variants"][variant]["probe_layers"]) + 1
    )
    assert rel_err(np.stack([to_np(f) for f in feats]), ref) < float32_bound(1e-4)


TOLERANCE = {"float16": 1e-2, "bfloat16": 5e-2}


@pytest.mark.parametrize("dtype", TOLERANCE)
@pytest.mark.parametrize("native", [False, True], ids=["widened", "native"])
@pytest.mark.parametrize("input_name", INPUTS)
def test_half_precision(converted, variant, dtype, native, input_name):
    """Half-precision weights, computed in float32 (CPU default) or natively (GPU default)."""
    model = aim_mlx.load(converted[variant, dtype])
    assert model.dtype == getattr(mx, dtype)
    model.compute_dtype = model.dtype if native else mx.float32
    ref = np.load(REF / f"logits_{variant}{INPUTS[input_name]}.npy")
    out = logits(model, input_name)
    tol = TOLERANCE[dtype]
    assert rel_err(out, ref) < tol  # a max error: top-1 kept wherever top-2 are 2 x tol apart


def test_half_precision_compute_dtype(converted):
    """By default float16 weights compute in float32 on the CPU and natively on the GPU;
    `compute_dtype` overrides it on either."""
    model = aim_mlx.load(converted["best", "float16"])
    x = mx.array(np.load(REF / "input.npy"))
    default = mx.float16 if ops.on_gpu() else mx.float32
    assert model.extract_features(x)[0].dtype == default
    for dtype in (mx.float16, mx.float32):
        model.compute_dtype = dtype
        assert model.extract_features(x)[0].dtype == dtype


def test_loading_leaves_the_random_key_as_it_was(converted):
    """Building a model draws random initial weights, lazily, from MLX's global key; loaded
    weights replace them. A seeded program drew other numbers after loading a model, and the
    key's chain of splits, never computed, grew with every model loaded (about 2 KB a layer)."""
    mx.random.seed(7)
    expected = np.array(mx.random.normal((4,)))
    mx.random.seed(7)
    for _ in range(3):
        aim_mlx.load(converted["best", "float32"])
    assert pending_operations(mx.random.state[0]) == 0
    np.testing.assert_array_equal(np.array(mx.random.normal((4,))), expected)
    assert pending_operations(mx.random.state[0]) > 0  # a draw of the program's own is lazy


def test_hub_folder_equals_backbone_and_head(converted, tmp_path):
    hub = aim_mlx.load(convert(tmp_path / "hub", hf_path=REF / "hf_repo", progress=False))
    pair = aim_mlx.load(converted["best", "float32"])
    assert hub.args.probe_layers == pair.args.probe_layers == (1, 2, 3, 4, 5, 6)
    np.testing.assert_array_equal(logits(hub, "input.npy"), logits(pair, "input.npy"))


def test_extract_features_block_selection():
    model = build_reference_model("best")  # probe layers 1..6 of 8 blocks
    x = mx.array(np.load(REF / "input.npy")[:1])
    all_blocks = model.extract_features(x, max_block_id=-1)
    assert len(all_blocks) == 8
    assert len(model.extract_features(x)) == 7
    first3 = model.extract_features(x, max_block_id=2)
    assert len(first3) == 3
    np.testing.assert_array_equal(to_np(first3[2]), to_np(all_blocks[2]))
    for bad in (8, -2):
        with pytest.raises(ValueError, match="max_block_id"):
            model.extract_features(x, max_block_id=bad)


def test_head_reads_the_mean_of_probe_layers():
    model = build_reference_model("last")
    x = mx.array(np.load(REF / "input.npy"))
    feats = model.extract_features(x)
    manual = np.mean([to_np(feats[i]) for i in (2, 3, 4, 5, 6, 7)], axis=0)
    np.testing.assert_allclose(to_np(model.head_input(feats)), manual, rtol=1e-5, atol=1e-6)


def test_compiled_forward_matches():
    model = build_reference_model("best")
    x = mx.array(np.load(REF / "input.npy"))
    compiled = mx.compile(model)
    ref = np.array(model(x))
    assert rel_err(np.array(compiled(x)), ref) < float32_bound(1e-5)
    x2 = mx.array(np.load(REF / "input_252x196.npy"))  # a new shape retraces
    ref = np.load(REF / "logits_best_252x196.npy")
    assert rel_err(np.array(compiled(x2)), ref) < float32_bound(1e-4)


def test_numpy_input_and_bad_inputs():
    model = build_reference_model("best")
    x = np.load(REF / "input.npy")
    np.testing.assert_array_equal(to_np(model(x)), to_np(model(mx.array(x))))
    with pytest.raises(ValueError, match=r"x\[None\]"):
        model(x[0])  # one image without its batch axis
    with pytest.raises(ValueError, match="float images"):
        model(mx.zeros((1, 3, 224, 224), dtype=mx.uint8))
    # the same for numpy pixels and lists (not silently read as float32 pixel values)
    for pixels in (np.zeros((1, 3, 28, 28), np.uint8), np.zeros((1, 3, 28, 28), int).tolist()):
        with pytest.raises(ValueError, match="float images"):
            model(pixels)
    np.testing.assert_array_equal(to_np(model(x[:1].tolist())), to_np(model(mx.array(x[:1]))))
    for path in ("photo.jpg", Path("photo.jpg")):  # was "got shape ()"
        with pytest.raises(ValueError, match=r"the path 'photo.jpg': aim_mlx.preprocess\(path\)"):
            model(path)


def test_bad_input_shape_is_explained():
    model = build_reference_model("best")
    with pytest.raises(ValueError, match="multiples of 14"):
        model(mx.zeros((1, 3, 225, 224)))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*x\.transpose\(0, 3, 1, 2\)\)"):
        model(mx.zeros((1, 224, 224, 3)))  # NHWC, as PIL and numpy images come
    with pytest.raises(ValueError, match=r"x\.transpose\(2, 0, 1\)\[None\]\)"):
        model(np.zeros((224, 224, 3), np.float32))  # one image, HWC
    with pytest.raises(ValueError, match="positive multiples of 14"):  # not MLX's conv error
        model(mx.zeros((1, 3, 0, 224)))


def test_sincos_position_embedding_by_hand():
    # grid of 2 rows x 3 columns, dim 8: omega = [1, 1/100]
    emb = np.array(sincos_pos_embed(2, 3, 8))
    assert emb.shape == (6, 8)
    omega = np.array([1.0, 0.01])
    for idx in range(6):
        row, col = divmod(idx, 3)
        expected = np.concatenate(
            [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
        )
        np.testing.assert_allclose(emb[idx], expected, rtol=1e-6, atol=1e-7)
    assert sincos_pos_embed(2, 3, 8) is sincos_pos_embed(2, 3, 8)  # cached per grid


def test_model_args_from_dict_ignores_unknown_keys():
    args = ModelArgs.from_dict(
        {
            "embed_dim": 64,
            "num_blocks": 8,
            "num_heads": 4,
            "probe_layers": [1, 2],
            "dtype": "float16",
            "whatever": 1,
        }
    )
    assert (args.embed_dim, args.probe_layers, args.head_dim) == (64, (1, 2), 16)
    with pytest.raises(ValueError, match="outside blocks"):
        ModelArgs(embed_dim=64, num_blocks=8, num_heads=4, probe_layers=(8,))
    with pytest.raises(ValueError, match="divisible"):
        ModelArgs(embed_dim=64, num_blocks=8, num_heads=5, probe_layers=(1,))


OFFICIAL = json.loads((REF / "official_parameter_shapes.json").read_text())


@pytest.mark.parametrize("name", PRESETS)
def test_official_parameter_names_and_shapes(name):
    """Every official key and shape, without allocating the weights (MLX init is lazy)."""
    from mlx.utils import tree_flatten

    mx.reset_peak_memory()
    before = mx.get_active_memory()
    model = AIM(preset_args(name))
    ours = {k: list(v.shape) for k, v in tree_flatten(model.parameters())}
    assert mx.get_active_memory() - before < 1 << 20  # nothing was materialised
    official = {k: shape for k, (shape, _) in OFFICIAL[name].items()}
    assert official.pop("head.bn.num_batches_tracked") == []  # the dropped counter
    o, i, h, w = official["preprocessor.patchifier.proj.weight"]
    official["preprocessor.patchifier.proj.weight"] = [o, h, w, i]  # OIHW -> OHWI
    assert ours == official
    assert sum(int(np.prod(s)) for s in ours.values()) == OFFICIAL[f"{name}:num_params"]


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_num_parameters_is_the_official_count_quantized_or_not(bits):
    """A quantized model counts its weights unpacked, not its uint32 words and scales: 8 and 4
    bits gave two different, smaller counts for the same aim-600M."""
    import mlx.nn as nn

    model = AIM(preset_args("aim-600M"))  # lazy: nothing is computed
    if bits:
        trunk = lambda path, m: path.startswith("trunk") and isinstance(m, nn.Linear)  # noqa: E731
        nn.quantize(model, group_size=64, bits=bits, class_predicate=trunk)
    assert model.num_parameters() == OFFICIAL["aim-600M:num_params"]


@pytest.mark.parametrize("kind", ["attention", "linear"])
def test_fine_tuning_the_head_keeps_the_trunk_and_the_statistics(kind):
    """`model.freeze(); model.head.unfreeze()` then AdamW: the head's weights learn, the trunk
    and the head's BatchNorm statistics (running mean and variance, not parameters) stay as
    they were; MLX's unfreeze had made the statistics trainable, moved by weight decay."""
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from aim_mlx.models.heads import LinearPoolingHead

    model = build_reference_model("best")
    if kind == "linear":
        model.replace_head(LinearPoolingHead(64, 3), model.args.probe_layers, ["a", "b", "c"])
    model.freeze()
    model.head.unfreeze()
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(k.startswith("head.") and ".bn." not in k for k in trainable)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    x, y = mx.array(np.load(REF / "input.npy")), mx.array([1, 2])
    step = nn.value_and_grad(model, lambda m: nn.losses.cross_entropy(m(x), y).mean())
    opt = optim.AdamW(learning_rate=1e-2, weight_decay=0.5)
    for _ in range(2):
        _, grads = step(model)
        opt.update(model, grads)
    changed = {k for k, v in tree_flatten(model.parameters()) if not np.array_equal(v, before[k])}
    assert changed == trainable


def test_presets_best_and_last_layers():
    assert preset_args("aim-600M").probe_layers == tuple(range(14, 20))
    assert preset_args("aim-1B").probe_layers == tuple(range(12, 18))
    assert preset_args("aim-7B", head="last").probe_layers == tuple(range(26, 32))
    assert preset_args("aim-3B", head="last").probe_layers == tuple(range(18, 24))
    for name, head in (("aim-3B", "Best"), ("aim-3B", None), ("aim-2B", "best")):
        with pytest.raises(ValueError, match="expected one of aim-600M, .* head best or last"):
            preset_args(name, head=head)  # a head other than best was the last layers, silently
