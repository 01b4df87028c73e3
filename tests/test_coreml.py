"""Core ML export: the saved package, read back and evaluated in numpy, against the MLX model.

Linux has no Core ML runtime, so `tests/mil_numpy.py` runs the saved ML Program op by op
(coremltools' own value inference, numpy for the rest). On macOS the last test also runs
`MLModel.predict`.
"""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REF, appears_before_publish, build_reference_model, exited_cleanly

from aim_mlx.export import coreml
from aim_mlx.models.layers import Linear

try:
    ct = coreml.require_coremltools()
except coreml.ExportError:
    pytest.skip("coremltools is not installed (the `coreml` extra)", allow_module_level=True)

import mil_numpy  # noqa: E402  (needs coremltools)

MEAN = np.array(coreml.IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = np.array(coreml.IMAGENET_STD).reshape(1, 3, 1, 1)

# Largest |probability - MLX probability| of a compressed fixture package (float16 weights),
# measured on the 10 inputs of `inputs` with coremltools 9.0 and tests/mil_numpy.py:
#                 iOS17    iOS18
#   int8          0.0175   0.0175   (linear, per channel)
#   palettize6    0.078    0.072    (k-means, per tensor / per 16 channels)
#   palettize4    0.138    0.273
# The bounds leave about 1.4x room. The fixture is a stress test (embed 64, random weights at
# a trained network's scale, so every weight is "important"; the weights themselves move by
# 0.6% / 2.4% / 10% RMS), not a prediction of the accuracy the official models lose.
COMPRESSION_BOUNDS = {
    ("int8", "iOS17"): 0.025,
    ("int8", "iOS18"): 0.025,
    ("palettize6", "iOS17"): 0.11,
    ("palettize6", "iOS18"): 0.11,
    ("palettize4", "iOS17"): 0.2,
    ("palettize4", "iOS18"): 0.4,
}


# ---------------------------------------------------------------------------------------------
# inputs: pixels (N, 3, 224, 224) as a camera hands them to Core ML, and the MLX reference


def to_pixels(normalised: np.ndarray) -> np.ndarray:
    """Undo the normalisation of preprocessed images and round to 8-bit pixel values."""
    return np.clip(np.round((normalised * STD + MEAN) * 255), 0, 255).astype(np.uint8)


def normalise(pixels: np.ndarray) -> mx.array:
    return mx.array(((pixels / 255.0 - MEAN) / STD).astype(np.float32))


def photo_pixels() -> np.ndarray:
    pre = np.load(REF / "preprocessed_224.npz")
    return to_pixels(np.stack([pre[k] for k in pre.files]))


def confident_pixels(model, pixels: np.ndarray, steps: int = 2) -> np.ndarray:
    """The images nudged (signed gradient ascent, 2 levels a step) towards their top class.

    The random fixture model is unsure about real photographs (top-1 margins 0.0005-0.1);
    these inputs give large margins, so that "keeps the top-1" can be tested.
    """
    x = mx.array(pixels.astype(np.float32))
    top = mx.argmax(model(normalise(pixels)), axis=-1)

    def loss(x):
        logp = nn.log_softmax(model((x / 255 - mx.array(MEAN)) / mx.array(STD)), axis=-1)
        return -mx.take_along_axis(logp, top[:, None], axis=-1).sum()

    grad = mx.grad(loss)
    for _ in range(steps):
        x = mx.clip(x - 2 * mx.sign(grad(x)), 0, 255)
    return np.round(np.array(x)).astype(np.uint8)


@pytest.fixture(scope="module")
def model():
    return build_reference_model("best")


def with_probs(model, pixels):
    """pixels (N, 3, 224, 224) uint8 and the MLX model's probabilities (N, 1000)."""
    return pixels, np.array(mx.softmax(model(normalise(pixels)), axis=-1))


@pytest.fixture(scope="module")
def photos(model):
    """The four photographs."""
    return with_probs(model, photo_pixels())


@pytest.fixture(scope="module")
def inputs(model):
    """10 inputs: the photographs, the two random inputs, and confident versions of the photos."""
    photos = photo_pixels()
    return with_probs(
        model,
        np.concatenate(
            [photos, to_pixels(np.load(REF / "input.npy")), confident_pixels(model, photos)]
        ),
    )


EXPORT_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(coreml.export_coreml).parameters.items()
    if p.kind is p.KEYWORD_ONLY
}


@pytest.fixture(scope="module")
def export(model, tmp_path_factory):
    """export(**options) -> path of the fixture model's package, built once per set of options
    (a default given or left out: one package)."""
    built = {}
    root = tmp_path_factory.mktemp("coreml")

    def get(**options):
        key = tuple(sorted({**EXPORT_DEFAULTS, **options}.items()))
        if key not in built:
            name = "-".join(f"{v}" for _, v in sorted(options.items())) or "default"
            built[key] = coreml.export_coreml(model, root / f"{name}.mlpackage", **options)
        return built[key]

    return get


def package_probs(path, pixels: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Probabilities (N, 1000) in label order and the predicted labels, from numpy evaluation."""
    prog, _ = mil_numpy.load_program(path)
    labels = coreml.imagenet_labels()
    probs, top = [], []
    for p in pixels:
        out = mil_numpy.evaluate(prog, {"image": p[None].astype(np.float32)})
        probs.append([out["classLabel_probs"][name] for name in labels])
        top.append(out["classLabel"])
    return np.array(probs), top


# ---------------------------------------------------------------------------------------------
# pieces


def test_labels_are_the_1000_imagenet_classes_and_unique():
    labels = coreml.imagenet_labels()
    assert len(labels) == 1000 == len(set(labels))
    assert labels[0] == "tench, Tinca tinca"
    assert labels[134] == "crane (n02012849)" and labels[517] == "crane (n03126707)"
    assert labels[999].startswith("toilet tissue")


def test_folded_patch_embedding_matches_the_mlx_convolution_on_normalised_input(model):
    pixels = photo_pixels()[:2]
    proj = model.preprocessor.patchifier.proj
    ref = np.array(proj(normalise(pixels).transpose(0, 2, 3, 1)))  # (2, 16, 16, D)
    w, b = coreml.folded_patch_embed(np.array(proj.weight), np.array(proj.bias))
    x = pixels.astype(np.float64) / 255  # what the package's convolution sees
    p = w.shape[-1]
    patches = x.reshape(2, 3, 16, p, 16, p)
    out = np.einsum("bchiwj,ocij->bhwo", patches, w) + b
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


def test_activation_ranges_follow_the_model(model, photos):
    x = normalise(photos[0][:2])
    stats = coreml.activation_ranges(model, x)
    assert set(stats) == coreml.FP16_KINDS["float16"]
    logits = np.array(model(x))
    assert stats["logits"][0] == pytest.approx(np.abs(logits).max(), rel=1e-5)
    feats = model.extract_features(x)
    assert stats["residual"][0] >= max(np.abs(np.array(f)).max() for f in feats) * (1 - 1e-6)


def test_activation_ranges_of_one_image_in_shards(model, photos, monkeypatch):
    """One image on two CPU streams runs each block in shards of its layers: the observed
    ranges are those of the one-stream forward."""
    x = normalise(photos[0][:1])
    with mx.stream(mx.cpu):  # this test's CPU only (pin_cpu would keep it for later tests)
        monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "1")
        whole = coreml.activation_ranges(model, x)
        monkeypatch.setenv("AIM_MLX_CPU_STREAMS", "2")
        sharded = coreml.activation_ranges(model, x)
    assert set(sharded) == set(whole)
    for kind, (value, block) in whole.items():
        assert sharded[kind][1] == block and sharded[kind][0] == pytest.approx(value, rel=1e-5)


def test_activation_ranges_run_the_models_own_forward(model, photos):
    """A change to the model shows in the ranges (no re-implementation), and the check leaves
    the model as it was. qkv's output is seen as attention's q, k and v."""
    x = normalise(photos[0][:2])
    before = np.array(model(x))
    for block, parent, name in ((3, "mlp", "fc2"), (2, "attn", "qkv")):
        layer = model.trunk.blocks[block][parent][name]
        weight = layer.weight
        try:
            layer.weight = weight * 1e4
            value, where = coreml.activation_ranges(model, x)["linear"]
            assert where == block and value > 1e3
        finally:
            layer.weight = weight
        assert type(model.trunk.blocks[block][parent][name]).__name__ == "Linear"
    np.testing.assert_array_equal(np.array(model(x)), before)


# ---------------------------------------------------------------------------------------------
# the package


def test_what_a_killed_export_left_is_removed_by_the_next(model, tmp_path):
    """A SIGKILL leaves the package being saved under a temporary name (PID 999999999: no
    such process) and, mid-replacement, the old package moved aside; the next export clears
    both."""
    out = tmp_path / "m.mlpackage"
    (tmp_path / ".m.mlpackage.partial-999999999-deadbeef").mkdir()
    (tmp_path / ".m.mlpackage.old-999999999-deadbeef").mkdir()
    (tmp_path / ".m.mlpackage.old-999999999-deadbeef" / "Manifest.json").write_text("{}")
    (tmp_path / "other.mlpackage.partial-999999999-deadbeef").mkdir()  # not hidden: not ours
    coreml.export_coreml(model, out, precision="float32", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "m.mlpackage", "other.mlpackage.partial-999999999-deadbeef"
    ]  # fmt: skip
    assert (out / "Manifest.json").read_text() != "{}"


def test_spec_is_an_xcode_image_classifier(export):
    path = export(precision="float32", name="fixture", source="backbone.pth + head.pth")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    d = spec.description
    (image,) = d.input
    assert image.name == "image"
    assert image.type.WhichOneof("Type") == "imageType"
    assert (image.type.imageType.width, image.type.imageType.height) == (224, 224)
    assert image.type.imageType.colorSpace == ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB
    assert [o.name for o in d.output] == ["classLabel", "classLabel_probs"]
    assert d.output[0].type.WhichOneof("Type") == "stringType"
    assert d.output[1].type.WhichOneof("Type") == "dictionaryType"
    assert d.predictedFeatureName == "classLabel"
    assert d.predictedProbabilitiesName == "classLabel_probs"
    meta = d.metadata
    assert meta.userDefined[coreml.PREVIEW_TYPE_KEY] == "imageClassifier"
    assert meta.userDefined["aim_mlx.model"] == "fixture"
    assert meta.userDefined["aim_mlx.source"] == "backbone.pth + head.pth"
    assert meta.userDefined["aim_mlx.img_size"] == "224"
    assert "Apple Sample Code License" in meta.license
    assert "fixture" in meta.shortDescription and "224x224" in meta.shortDescription
    assert "256" in d.input[0].shortDescription  # resize to ceil(224 / 0.875) then crop
    # the class labels: stored once, in logit order (the program's classify op holds them)
    prog, _ = mil_numpy.load_program(path)
    (classify,) = [op for op in prog.functions["main"].operations if op.op_type == "classify"]
    assert list(classify.classes.val) == coreml.imagenet_labels()


def test_a_head_of_other_than_imagenets_classes_is_exported_with_its_own_labels(tmp_path):
    """A converted head of 10 classes: labelled "class 0" ... "class 9" as classify names them,
    not refused as "10 classes but 1000 labels were given" (no labels were given)."""
    import dataclasses

    from conftest import reference_args, reference_weights

    from aim_mlx.models import AIM

    model = AIM(dataclasses.replace(reference_args("best"), num_classes=10))
    weights = reference_weights("best")
    rng = np.random.default_rng(0)
    weights["head.linear.weight"] = mx.array(rng.standard_normal((10, 64), dtype=np.float32))
    model.load_weights(list(weights.items()))
    path = coreml.export_coreml(model, tmp_path / "ten.mlpackage", precision="float32")
    prog, spec = mil_numpy.load_program(path)
    (classify,) = [op for op in prog.functions["main"].operations if op.op_type == "classify"]
    assert list(classify.classes.val) == [f"class {i}" for i in range(10)]
    described = spec.description.output[0].shortDescription
    assert "10 classes" in described and "(ImageNet-1k)" not in described


@pytest.mark.parametrize("target", coreml.TARGETS)
def test_float32_package_matches_mlx(export, photos, target):
    pixels, ref = photos
    probs, top = package_probs(export(precision="float32", target=target), pixels)
    assert np.abs(probs - ref).max() < 1e-5
    labels = coreml.imagenet_labels()
    assert top == [labels[i] for i in ref.argmax(axis=1)]


def test_other_image_size(export, model, photos):
    """112 px: an 8 x 8 patch grid, so the position embedding is computed for that grid."""
    pixels = photos[0][:2, :, 56:168, 56:168]
    ref = np.array(mx.softmax(model(normalise(pixels)), axis=-1))
    path = export(precision="float32", img_size=112)
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert spec.description.input[0].type.imageType.width == 112
    assert "128" in spec.description.input[0].shortDescription  # ceil(112 / 0.875)
    probs, _ = package_probs(path, pixels)
    assert np.abs(probs - ref).max() < 1e-5


def test_float32_package_matches_the_official_pytorch_logits(export):
    """Independent of MLX: the photographs' probabilities from the reference implementation."""
    ref_logits = np.load(REF / "logits_images_best.npz")
    pre = np.load(REF / "preprocessed_224.npz")
    # feed the exact preprocessed tensors (unrounded pixels) to compare like with like
    pixels = np.stack([pre[k] for k in pre.files]) * STD + MEAN
    probs, _ = package_probs(export(precision="float32"), pixels * 255)
    ref = np.stack([ref_logits[k] for k in pre.files]).reshape(len(pre.files), -1)
    ref = np.exp(ref - ref.max(1, keepdims=True))
    assert np.abs(probs - ref / ref.sum(1, keepdims=True)).max() < 1e-5


@pytest.mark.parametrize(
    "precision,target", [("float16", "iOS17"), ("float16", "iOS18"), ("mixed", "iOS17")]
)
def test_half_precision_package_matches_mlx(export, photos, precision, target):
    pixels, ref = photos
    path = export(precision=precision, target=target)
    probs, _ = package_probs(path, pixels)
    assert np.abs(probs - ref).max() < 1e-3
    # the dtypes each kind of op computes in: mixed keeps layer norms and attention in float32
    prog, _ = mil_numpy.load_program(path)
    dtypes = {}
    for op in prog.functions["main"].operations:
        if op.op_type not in ("const", "classify"):
            dtypes.setdefault(op.op_type, set()).add(op.outputs[0].dtype.__name__)
    hi = "fp32" if precision == "mixed" else "fp16"
    attention = "scaled_dot_product_attention" if target == "iOS18" else "matmul"
    assert dtypes["linear"] == {"fp16"}
    assert dtypes["layer_norm"] == dtypes[attention] == {hi}


def test_float16_package_stores_weights_in_half_the_space(export):
    full = coreml.weight_file_size(export(precision="float32"))
    half = coreml.weight_file_size(export(precision="float16"))
    assert 0.45 < half / full < 0.55


def test_features_variant_outputs_the_pooled_descriptor(export, model, photos):
    pixels = photos[0][:3]
    path = export(precision="float32", features=True)
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    assert [o.name for o in spec.description.output] == ["features"]
    assert coreml.PREVIEW_TYPE_KEY not in spec.description.metadata.userDefined
    prog, _ = mil_numpy.load_program(path)
    out = np.concatenate(
        [
            mil_numpy.evaluate(prog, {"image": p[None].astype(np.float32)})["features"]
            for p in pixels
        ]
    )
    # reference: the MLX model with its last linear layer removed
    linear = model.head.linear
    model.head.linear = nn.Identity()
    try:
        ref = np.array(model(normalise(pixels)))
    finally:
        model.head.linear = linear
    assert out.shape == (3, 64)
    assert np.abs(out - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_quantized_model_is_dequantized(tmp_path, photos, dtype):
    """Also with half-precision scales: the weights are dequantized in float32, as the model
    computes them (they were rounded to the scales' dtype first, 1e-4 to 1e-3 off MLX)."""
    q = build_reference_model("best")
    q.set_dtype(dtype)
    nn.quantize(q, group_size=32, bits=4, class_predicate=lambda _, m: isinstance(m, Linear))
    assert isinstance(q.trunk.blocks[0].attn.qkv, nn.QuantizedLinear)
    pixels = photos[0][:2]
    ref = np.array(mx.softmax(q(normalise(pixels)), axis=-1))
    path = coreml.export_coreml(q, tmp_path / "q.mlpackage", precision="float32")
    probs, _ = package_probs(path, pixels)
    assert np.abs(probs - ref).max() < 1e-5


# ---------------------------------------------------------------------------------------------
# compression


# palettize6 on iOS18 takes the same code path as palettize4 there (and its k-means is slow)
@pytest.mark.parametrize(
    "compress,target", sorted(set(COMPRESSION_BOUNDS) - {("palettize6", "iOS18")})
)
def test_compressed_package_stays_within_its_bound(export, inputs, compress, target):
    pixels, ref = inputs
    path = export(precision="float16", compress=compress, target=target)
    probs, _ = package_probs(path, pixels)
    bound = COMPRESSION_BOUNDS[compress, target]
    assert np.abs(probs - ref).max() < bound
    # the top-1 survives wherever the float model's margin exceeds the bound
    top2 = np.sort(ref, axis=1)[:, -2:]
    sure = top2[:, 1] - top2[:, 0] > bound
    assert sure.sum() >= 3  # the test must not be vacuous
    assert (probs.argmax(1) == ref.argmax(1))[sure].all()
    # the weights really are compressed: constexpr ops, and a smaller weight file
    prog, _ = mil_numpy.load_program(path)
    kinds = {op.op_type for op in prog.functions["main"].operations}
    assert kinds & {
        "constexpr_lut_to_dense",
        "constexpr_affine_dequantize",
        "constexpr_blockwise_shift_scale",
    }
    # (on iOS18 the fixture's head.linear, 1000 x 64 and 14% of its weights, stays float16:
    # 1000 rows are not a multiple of the palettization group of 16)
    ratio = coreml.weight_file_size(path) / coreml.weight_file_size(export(precision="float16"))
    assert ratio < {"int8": 0.6, "palettize6": 0.5, "palettize4": 0.45}[compress]


def test_compression_with_shared_zero_constants(tmp_path, photos):
    """Zero LayerNorm biases (fresh weights) equal the linear layers' zero biases; the export
    must not merge them into one constant that the compressor then refuses."""
    m = build_reference_model("best")
    for blk in m.trunk.blocks:
        blk.norm_1.bias = mx.zeros_like(blk.norm_1.bias)
    pixels = photos[0][:1]
    ref = np.array(mx.softmax(m(normalise(pixels)), axis=-1))
    path = coreml.export_coreml(m, tmp_path / "m.mlpackage", compress="int8")
    probs, _ = package_probs(path, pixels)
    assert np.abs(probs - ref).max() < COMPRESSION_BOUNDS["int8", "iOS17"]


# ---------------------------------------------------------------------------------------------
# float16 range check


def overflowing_model(where: str, scale: float = 1e5):
    """The fixture with activations pushed past float16's range.

    "residual": the patch embedding's LayerNorm scaled `scale` times (1e5 by default), so the
    residual stream grows as much while each block's normalised inputs stay small; the head's
    BatchNorm statistics are scaled to match, so its output is unchanged. "linear": an MLP
    weight scaled so that a linear layer's output overflows.
    """
    m = build_reference_model("best")
    if where == "residual":
        norm = m.preprocessor.patchifier.norm
        norm.weight = norm.weight * scale
        norm.bias = norm.bias * scale
        bn = m.head.bn
        bn.running_mean = bn.running_mean * scale
        bn.running_var = bn.running_var * scale**2
    else:
        fc1 = m.trunk.blocks[3].mlp.fc1
        fc1.weight = fc1.weight * 1e5
    return m


def test_float16_export_refuses_overflow_and_suggests_mixed(tmp_path):
    m = overflowing_model("residual")
    out = tmp_path / "m.mlpackage"
    with pytest.raises(coreml.ExportError, match="--precision mixed") as e:
        coreml.export_coreml(m, out, precision="float16")
    assert "residual" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # mixed keeps the residual stream in float32: it exports and still matches MLX
    pixels = photo_pixels()[:2]
    ref = np.array(mx.softmax(m(normalise(pixels)), axis=-1))
    probs, _ = package_probs(coreml.export_coreml(m, out, precision="mixed"), pixels)
    assert np.abs(probs - ref).max() < 1e-3


# coremltools' own float16 value inference of a layer norm on this deliberately large residual
# stream (the package itself is checked against MLX below)
@pytest.mark.filterwarnings("ignore:overflow encountered in square:RuntimeWarning")
def test_float16_mean_of_the_probe_layers_stays_in_range(tmp_path):
    """A residual stream within the check's limit, whose sum over the six probe layers is
    not: the package takes their mean without leaving float16's range (it summed them first,
    and gave NaN probabilities)."""
    m = overflowing_model("residual", scale=5000)
    residual = coreml.activation_ranges(m, coreml.synthetic_sample(224))["residual"][0]
    assert coreml.FP16_MAX / 6 < residual < coreml.FP16_MAX / coreml.FP16_HEADROOM
    pixels = photo_pixels()[:1]
    ref = np.array(mx.softmax(m(normalise(pixels)), axis=-1))
    for features in (False, True):
        out = tmp_path / f"{features}.mlpackage"
        coreml.export_coreml(m, out, precision="float16", features=features)
        if not features:
            probs, _ = package_probs(out, pixels)
            assert np.abs(probs - ref).max() < 1e-3
            continue
        prog, _ = mil_numpy.load_program(out)
        got = mil_numpy.evaluate(prog, {"image": pixels.astype(np.float32)})["features"]
        linear, m.head.linear = m.head.linear, nn.Identity()  # the MLX model's features
        try:
            want = np.array(m(normalise(pixels)))
        finally:
            m.head.linear = linear
        assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_range_check_covers_only_what_the_package_computes(tmp_path):
    """Logits past float16's range: the classifier is refused, the feature extractor is not."""
    m = build_reference_model("best")
    m.head.linear.weight = m.head.linear.weight * 1e6
    with pytest.raises(coreml.ExportError, match="logits"):
        coreml.export_coreml(m, tmp_path / "c.mlpackage")
    assert coreml.export_coreml(m, tmp_path / "f.mlpackage", features=True).is_dir()


@pytest.mark.parametrize("layer, undo", [("k", "cls_token"), ("v", "linear")])
def test_float16_export_checks_the_head_keys_and_values(tmp_path, layer, undo):
    """The package computes the head's keys and values for every token, which the MLX head
    folds away: scaled up (and scaled back after, so that scores and logits are unchanged), they
    still stop a float16 export."""
    m = build_reference_model("best")
    m.head[layer].weight = m.head[layer].weight * 1e6
    if undo == "linear":
        m.head.linear.weight = m.head.linear.weight * 1e-6
    else:
        m.head.cls_token = m.head.cls_token * 1e-6
    with pytest.raises(coreml.ExportError, match=r"linear activations reach .*outside the trunk"):
        coreml.export_coreml(m, tmp_path / "m.mlpackage")


def test_mixed_export_refuses_overflow_in_linear_layers(tmp_path):
    with pytest.raises(coreml.ExportError, match="--precision float32"):
        coreml.export_coreml(
            overflowing_model("linear"), tmp_path / "m.mlpackage", precision="mixed"
        )


# ---------------------------------------------------------------------------------------------
# command line


def export_in_a_process(tmp_path, out, before_main="", preexec_fn=None):
    """`aim-mlx export coreml` of the fixture in its own process, with TMPDIR tmp_path/tmp."""
    import subprocess
    import textwrap

    from conftest import convert_fixture

    folder = tmp_path / "fixture"
    if not folder.exists():
        convert_fixture(folder)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    script = textwrap.dedent(before_main) + textwrap.dedent(f"""
        import sys
        from aim_mlx.cli import main
        sys.argv = ["aim-mlx", "export", "coreml", "-m", {str(folder)!r}, "--out", {str(out)!r},
                    "--precision", "float32", "--force"]
        main()
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          preexec_fn=preexec_fn, timeout=300)  # fmt: skip


def test_a_full_disk_is_one_error_line_and_leaves_nothing(tmp_path):
    """Files limited to 1 MB (RLIMIT_FSIZE: EFBIG, as a full disk), the fixture's weights are
    1.8 MiB: coremltools fails writing them; one `Error:` line, no package, no temporary files."""
    import resource

    out = tmp_path / "out" / "m.mlpackage"
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # noqa: E731
    res = export_in_a_process(tmp_path, out, preexec_fn=limit)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert f"Error: cannot write {out} (is the disk full?)" in res.stderr
    assert list((tmp_path / "out").iterdir()) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_a_killed_export_leaves_its_temporary_packages_beside_the_output(tmp_path):
    """coremltools writes a temporary package as big as the model (more with compression),
    removed when the process exits normally; a SIGKILL leaves it: beside the output, where the
    next export removes it, not in TMPDIR for good."""
    out = tmp_path / "out" / "m.mlpackage"
    res = export_in_a_process(
        tmp_path,
        out,
        before_main="""
        import os, signal
        from aim_mlx.export import coreml
        def killed(ct, mlmodel, *args):  # after ct.convert wrote its temporary package
            os.kill(os.getpid(), signal.SIGKILL)
        coreml._compress = killed
    """,
    )
    assert res.returncode == -signal.SIGKILL, res.stderr
    assert list((tmp_path / "tmp").iterdir()) == []
    assert [p.name.split("-")[0] for p in (tmp_path / "out").iterdir()] == [".m.mlpackage.partial"]
    res = export_in_a_process(tmp_path, out)
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["m.mlpackage"]


def test_cli_exports_a_converted_folder(tmp_path, photos):
    from aim_mlx.cli import main
    from aim_mlx.convert import convert

    folder = convert(tmp_path / "fixture", hf_path=REF / "hf_repo", progress=False, name="tiny")
    out = tmp_path / "Tiny.mlpackage"
    args = ["export", "coreml", "--model", str(folder), "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--precision", "float32"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out}" in res.output
    meta = ct.models.MLModel(str(out), skip_model_load=True).get_spec().description.metadata
    assert meta.userDefined["aim_mlx.model"] == "tiny"
    assert "pytorch_model.bin" in meta.userDefined["aim_mlx.source"]
    # the hub folder holds the best-layers head: same probabilities as the fixture model
    pixels, ref = photos
    probs, _ = package_probs(out, pixels[:1])
    assert np.abs(probs - ref[:1]).max() < 1e-5
    # user mistakes: a clear message, no traceback, nothing replaced
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "already exists" in res.output and "--force" in res.output
    res = CliRunner().invoke(main, [*args, "--force", "--img-size", "100"])
    assert res.exit_code == 2 and "multiple of 14" in res.output  # a usage error
    res = CliRunner().invoke(main, ["export", "coreml", "--model", "aim-600M", "--out", "x"])
    assert res.exit_code == 2 and "must end in .mlpackage" in res.output  # a usage error
    res = CliRunner().invoke(main, [*args[:3], str(tmp_path / "nothing"), *args[4:], "--force"])
    assert "neither a known model" in exited_cleanly(res, 1).output
    assert CliRunner().invoke(main, [*args, "--force", "--features"]).exit_code == 0
    # the float16 range check on the user's own photographs
    photo = str(REF / "images" / "rocket.jpg")
    res = CliRunner().invoke(main, [*args, "--force", "--sample", photo, "--sample", photo])
    assert res.exit_code == 0, res.output
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("hello")
    res = CliRunner().invoke(main, [*args, "--force", "--sample", str(not_an_image)])
    assert res.exit_code == 2 and "--sample" in res.output and "notes.jpg" in res.output
    float32 = [*args, "--force", "--precision", "float32", "--sample", photo]
    res = CliRunner().invoke(main, float32)  # no range check to feed: not silently ignored
    assert res.exit_code == 2 and "a float32 package has none" in res.output
    # -q made a package of float weights dequantized from 4 bits: their error, not their size
    for quantize in (["-q"], ["-q", "--q-bits", "4"], ["--q-bits", "4"]):
        res = CliRunner().invoke(main, [*args, "--force", *quantize])
        assert res.exit_code == 2 and "Error: a package holds float weights" in res.output
        assert "--compress int8, palettize6 or palettize4" in res.output


def test_a_quantized_folder_is_exported_with_a_note(tmp_path):
    """A folder converted with -q goes into the package dequantized (float weights, as README
    says): the command says so, and which --compress makes the package small again."""
    from aim_mlx.cli import main
    from aim_mlx.convert import convert

    model = convert(tmp_path / "q4", hf_path=REF / "hf_repo", quantize=True, q_bits=4,
                    q_group_size=32, progress=False)  # fmt: skip
    out = tmp_path / "m.mlpackage"
    args = ["export", "coreml", "-m", str(model), "-o", str(out), "--precision", "float32"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "note: the model's 4-bit weights are in the package dequantized" in res.stdout
    assert "--compress int8 or palettize4 / palettize6 makes it smaller" in res.stdout
    res = CliRunner().invoke(main, [*args, "--force", "--compress", "int8"])
    assert res.exit_code == 0 and "note:" not in res.stdout, res.output


def test_a_package_made_during_the_export_is_kept(export, tmp_path, monkeypatch):
    """Without --force, a package another process wrote after the output was checked (here just
    before this one is renamed into place) is kept: one error line, nothing of this export left."""
    from aim_mlx.cli import main
    from aim_mlx.convert import convert

    theirs = export(precision="float32")
    out = tmp_path / "m.mlpackage"
    made = appears_before_publish(monkeypatch, out, lambda p: shutil.copytree(theirs, p))
    model = tmp_path / "fixture"
    convert(model, hf_path=REF / "hf_repo", progress=False)
    args = ["export", "coreml", "-m", str(model), "-o", str(out), "--precision", "float32"]
    res = CliRunner().invoke(main, args)
    exited_cleanly(res, 1)
    assert made == [out]
    assert res.stderr.splitlines()[-1] == (
        f"Error: {out} appeared while this command ran (another process?) and is kept; choose "
        "another output, or pass --force to replace it"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixture", "m.mlpackage"]
    assert sorted(os.listdir(out)) == sorted(os.listdir(theirs))
    assert (out / "Manifest.json").read_bytes() == (theirs / "Manifest.json").read_bytes()


def test_cli_without_coremltools_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # import coremltools -> ImportError
    from aim_mlx.cli import main

    args = ["export", "coreml", "--model", "aim-600M", "--out", str(tmp_path / "m.mlpackage")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1
    assert "pip install 'aim-mlx[coreml]'" in res.output


# ---------------------------------------------------------------------------------------------
# macOS


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML prediction needs macOS")
@pytest.mark.parametrize("precision,tol", [("float32", 1e-4), ("float16", 1e-2)])
def test_coreml_predict_matches_mlx(export, photos, precision, tol):
    from PIL import Image

    pixels, ref = photos
    path = export(precision=precision)
    units = ct.ComputeUnit.CPU_ONLY if precision == "float32" else ct.ComputeUnit.ALL
    mlmodel = ct.models.MLModel(str(path), compute_units=units)
    labels = coreml.imagenet_labels()
    for p, r in zip(pixels, ref, strict=True):
        out = mlmodel.predict({"image": Image.fromarray(p.transpose(1, 2, 0))})
        probs = np.array([out["classLabel_probs"][name] for name in labels])
        assert np.abs(probs - r).max() < tol
        if np.sort(r)[-1] - np.sort(r)[-2] > 2 * tol:
            assert out["classLabel"] == labels[int(r.argmax())]


def test_exports_in_threads_take_turns_with_the_temporary_folder(tmp_path):
    """coremltools writes under tempfile's folder, a process-wide setting: two exports in
    threads of one process each see their own folder throughout, and the setting is given
    back afterwards."""
    import tempfile
    import threading
    import time

    before, seen = tempfile.tempdir, []

    def export(name: str):
        with coreml._temporary_files_in(tmp_path / name):
            seen.append((name, tempfile.gettempdir()))
            time.sleep(0.2)  # the other thread tries to start meanwhile
            seen.append((name, tempfile.gettempdir()))

    threads = [threading.Thread(target=export, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tempfile.tempdir == before
    first, second = seen[0][0], seen[2][0]
    assert {first, second} == {"a", "b"}
    assert seen == [(n, str(tmp_path / n)) for n in (first, first, second, second)]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"precision": "bf16"}, "precision must be one of float16, float32, mixed, got 'bf16'"),
        ({"compress": "int4"}, "compress must be one of none, int8"),
        ({"img_size": 30}, "img_size must be a positive multiple of the patch size 14, got 30"),
        ({"img_size": 0}, "got 0"),  # was the model's 224 px, silently
        ({"img_size": 14.0}, "got 14.0"),  # was a TypeError from coremltools
        # a Linux folder name that is not UTF-8 (a trained head's class): was coremltools'
        # UnicodeEncodeError once converted
        ({"labels": ["a\udce9", *map(str, range(999))]}, r"label 'a\\udce9' is not UTF-8"),
        # the package's classLabel_probs held 999 classes, one probability lost
        ({"labels": ["a", "a", *map(str, range(998))]}, "the label 'a' is given more than once"),
    ],
)
def test_bad_options_are_refused_before_the_output_folders_are_made(
    model, tmp_path, options, message
):
    out = tmp_path / "new" / "m.mlpackage"
    with pytest.raises(coreml.ExportError, match=message):
        coreml.export_coreml(model, out, progress=False, **options)
    assert list(tmp_path.iterdir()) == []  # no folder made for an export that cannot run


def test_a_model_name_instead_of_a_model_is_a_clear_type_error(tmp_path):
    """As aim_mlx.classify and embed say it (was "'str' object has no attribute 'args'")."""
    with pytest.raises(TypeError, match=r"give a loaded model, model = aim_mlx.load\(...\)"):
        coreml.export_coreml("aim-600M", tmp_path / "m.mlpackage")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_coremltools_import_ends_the_export(monkeypatch):
    """coremltools' import swallows exceptions in bare `except:` clauses: the CLI's SystemExit
    on SIGTERM (a launcher or `timeout` stopping it) was lost there, and the export went on."""
    import importlib.abc
    import importlib.util
    import time

    class SwallowingImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_loader(name, self) if name == "coremltools" else None

        def create_module(self, spec):
            return None

        def exec_module(self, module):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
            except BaseException:  # what coremltools' import does
                pass

    monkeypatch.delitem(sys.modules, "coremltools")
    monkeypatch.setattr(sys, "meta_path", [SwallowingImport(), *sys.meta_path])
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # as the CLI's
    try:
        with pytest.raises(SystemExit):
            coreml.require_coremltools()
    finally:
        signal.signal(signal.SIGTERM, previous)
