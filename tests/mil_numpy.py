"""Evaluate a saved Core ML ML Program with numpy (Linux has no Core ML runtime).

The `.mlpackage` is read back with coremltools (spec + weight blob) into a MIL program, exactly
as saved, and its ops run one by one: with coremltools' own `value_inference` (or
`materialized_val_inference` for the compressed-weight `constexpr_*` ops) where the op has one,
with the small numpy versions below otherwise (conv and classify, which coremltools does not
evaluate, reduce_mean, and the exact GELU, which it evaluates one element at a time).

float16: a float16 variable holds float16 values (coremltools stores what is bound to a variable
in its declared dtype), so the ops coremltools evaluates compute in numpy's float16 arithmetic,
each result rounded to float16. conv here widens its inputs to float32, and np.mean accumulates
float16 in float32. Core ML on a GPU or the Neural Engine may accumulate in wider precision than
it stores, so this is the stricter of the two.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.special import erf


def load_program(path):
    """(MIL program, model spec) of a saved .mlpackage."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load

    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    return load(spec, spec.specificationVersion, mlmodel.weights_dir), spec


def _conv(op, x, weight, bias):
    """NCHW convolution, groups 1, explicit or "valid" padding."""
    sh, sw = (int(s) for s in op.strides.val)
    if op.dilations is not None and any(d != 1 for d in op.dilations.val):
        raise NotImplementedError("dilated conv")
    if op.groups is not None and op.groups.val != 1:
        raise NotImplementedError("grouped conv")
    if op.pad_type.val not in ("valid", "custom"):
        raise NotImplementedError(f"pad_type {op.pad_type.val}")
    pad = [int(p) for p in op.pad.val] if op.pad_type.val == "custom" else [0, 0, 0, 0]
    x = np.pad(x, [(0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])])
    out_ch, _, kh, kw = weight.shape
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    y = np.einsum("bchwij,ocij->bohw", win, weight, optimize=True)  # (B, O, h, w)
    return y if bias is None else y + bias.reshape(1, out_ch, 1, 1)


def _classify(op, probs):
    classes = list(op.classes.val.ls if hasattr(op.classes.val, "ls") else op.classes.val)
    p = probs.reshape(-1)
    return classes[int(np.argmax(p))], dict(zip(classes, p.tolist(), strict=True))


def _value(var):
    v = var.val
    return None if v is None else np.asarray(v)


def _bind(var, value):
    """Give `var` a concrete value so that the ops reading it can run value inference."""
    sym = var.sym_type()
    sym.val = value
    var._sym_val = sym


def _wide(a):
    """float16 values widened to float32 (for conv's arithmetic)."""
    return a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float16 else a


def _round_to(var, a):
    """A float op output rounded to its declared dtype (float16 or float32); binding it stores
    it in that dtype."""
    from coremltools.converters.mil.mil import types

    a = np.asarray(a)
    if types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type):
        want = types.nptype_from_builtin(var.dtype)
        if want in (np.float16, np.float32):
            return np.asarray(a.astype(want), dtype=np.float32)
    return a


def _run_op(op):
    """Outputs (tuple) of one op."""
    t = op.op_type
    if t == "conv":
        return (
            _conv(
                op,
                *(_wide(_value(v)) if v is not None else None for v in (op.x, op.weight, op.bias)),
            ),
        )
    if t == "classify":
        return _classify(op, _value(op.probabilities))
    if t == "reduce_mean":  # coremltools' own trips over numpy's bool keep_dims
        axes = tuple(int(a) for a in op.axes.val)
        return (np.mean(_value(op.x), axis=axes, keepdims=bool(op.keep_dims.val)),)
    if t == "gelu" and op.mode.val == "EXACT":  # coremltools' own runs math.erf per element
        x = _value(op.x)
        return (0.5 * x * (1 + erf(x / np.sqrt(2))),)
    # constexpr_* ops decompress weights (palettized / quantized) with their own numpy code
    out = op.materialized_val_inference() if t.startswith("constexpr_") else op.value_inference()
    return out if isinstance(out, tuple) else (out,)


def evaluate(prog, feeds: dict[str, np.ndarray]) -> dict:
    """Run the program's main function; returns its outputs by name.

    feeds: input name -> array (an image input takes float pixel values 0..255, NCHW, as
    Core ML hands them to the program).
    """
    fn = prog.functions["main"]
    for name, var in fn.inputs.items():
        _bind(var, np.asarray(feeds[name], dtype=np.float32))
    results = {}  # the classify op's label and dictionary (not tensors)
    for op in fn.operations:
        if op.op_type == "const":  # weights hold their values as loaded, in their own dtype
            continue
        outs = _run_op(op)
        if op.op_type == "classify":
            results.update(zip((v.name for v in op.outputs), outs, strict=True))
            continue
        for var, val in zip(op.outputs, outs, strict=True):
            if val is None:
                raise NotImplementedError(f"no value for {op.op_type} ({op.name})")
            _bind(var, _round_to(var, val))
    return {v.name: results[v.name] if v.name in results else _value(v) for v in fn.outputs}
