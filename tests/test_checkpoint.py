"""The checkpoint reader: exact tensors, no code execution, clear errors."""

import pickle
import subprocess
import sys
import zipfile

import mlx.core as mx
import numpy as np
import pytest
from torch_zip import _global, _str, _tuple, save_torch_zip, state_dict_pickle

from aim_mlx.convert import (
    CheckpointError,
    ConversionError,
    UnsafePickleError,
    convert,
    open_checkpoint,
)


def test_reads_fixture_tensors_exactly(ref_dir):
    head = open_checkpoint(ref_dir / "head_best_layers.pth")
    assert head.keys() == [
        "head.cls_token",
        "head.k.weight",
        "head.v.weight",
        "head.linear.weight",
        "head.bn.running_mean",
        "head.bn.running_var",
        "head.bn.num_batches_tracked",
    ]
    assert head.shape("head.linear.weight") == (1000, 64)
    assert head.dtype("head.bn.num_batches_tracked") == "int64"
    # The raw storage bytes of a tensor are exactly what the reader returns.
    with zipfile.ZipFile(ref_dir / "head_best_layers.pth") as z:
        raw = np.frombuffer(z.read("head_best_layers/data/3"), dtype="<f4").reshape(1000, 64)
    np.testing.assert_array_equal(np.array(head.load("head.linear.weight")), raw)


def test_round_trip_through_a_torch_free_writer(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal((5,)).astype(np.float16),
        "c": np.array(7, dtype=np.int64),
    }
    path = save_torch_zip(tmp_path / "x.pth", tensors, with_metadata=True)
    ckpt = open_checkpoint(path)
    assert ckpt.keys() == ["a", "b", "c"]
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.array(ckpt.load(k)), v)


def test_strided_and_offset_tensors(tmp_path):
    base = np.arange(12, dtype=np.float32)
    specs = [
        ("t", np.float32, (4, 3), (1, 4), 0, 12),  # a transposed (3, 4) view
        ("s", np.float32, (2,), (1,), 5, 12),  # a slice starting at element 5
    ]
    data = state_dict_pickle(specs)
    path = tmp_path / "strided.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("strided/data.pkl", data)
        z.writestr("strided/data/0", base.tobytes())
        z.writestr("strided/data/1", base.tobytes())
    ckpt = open_checkpoint(path)
    np.testing.assert_array_equal(np.array(ckpt.load("t")), base.reshape(3, 4).T)
    np.testing.assert_array_equal(np.array(ckpt.load("s")), base[5:7])


def test_bfloat16_storage(tmp_path):
    values = np.array([1.0, -2.5, 3.140625], dtype=np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bfloat16
    data = state_dict_pickle(
        [("w", np.uint16, (3,), (1,), 0, 3)], storage_names={np.dtype(np.uint16): "BFloat16Storage"}
    )
    path = tmp_path / "bf16.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("bf16/data.pkl", data)
        z.writestr("bf16/data/0", bits.tobytes())
    w = open_checkpoint(path).load("w")
    assert w.dtype == mx.bfloat16
    np.testing.assert_array_equal(np.array(w.astype(mx.float32)), values)


# Each payload runs a command when given to pickle.loads (checked below), creating MARKER.
PAYLOADS = {
    "os.system": lambda m: _global("os", "system") + _tuple([_str(f"touch {m}")]) + pickle.REDUCE,
    "builtins.eval": lambda m: (
        _global("builtins", "eval")
        + _tuple([_str(f"open({str(m)!r}, 'w').close()")])
        + pickle.REDUCE
    ),
    "subprocess.call": lambda m: (
        _global("subprocess", "call")
        + _tuple([pickle.MARK + _str("touch") + _str(str(m)) + pickle.LIST])
        + pickle.REDUCE
    ),
    "posix.system": lambda m: (
        _global("posix", "system") + _tuple([_str(f"touch {m}")]) + pickle.REDUCE
    ),
}


def _malicious_pickle(kind, marker) -> bytes:
    return pickle.PROTO + b"\x02" + PAYLOADS[kind](marker) + pickle.STOP


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_payload_is_live_under_plain_pickle(tmp_path, kind):
    """The payloads really do run code with an unrestricted unpickler (so the refusal matters)."""
    marker = tmp_path / "pwned"
    code = "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"
    subprocess.run([sys.executable, "-c", code], input=_malicious_pickle(kind, marker), check=True)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
def test_malicious_checkpoint_is_refused_without_running(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = save_torch_zip(tmp_path / "evil.pth", {}, pickle_bytes=_malicious_pickle(kind, marker))
    with pytest.raises(UnsafePickleError, match=kind.replace(".", r"\.")):
        open_checkpoint(path)
    assert not marker.exists()


def test_malicious_payload_inside_a_real_state_dict(tmp_path, ref_dir):
    """A code-running global hidden after legitimate tensors is refused; nothing is written."""
    marker = tmp_path / "pwned"
    legit = state_dict_pickle([("w", np.float32, (2,), (1,), 0, 2)])
    evil = legit[:-1] + pickle.POP + PAYLOADS["os.system"](marker) + pickle.STOP
    path = save_torch_zip(tmp_path / "backbone.pth", {}, pickle_bytes=evil)
    with pytest.raises(ConversionError, match="refusing to load global 'os.system'"):
        convert(
            tmp_path / "out",
            backbone=path,
            head=ref_dir / "head_best_layers.pth",
            num_heads=4,
            probe_layers="last",
            progress=False,
        )
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_reduce_and_build_only_on_allowed_objects(tmp_path):
    # BUILD applied to a tensor (not an OrderedDict) is refused.
    legit = state_dict_pickle([("w", np.float32, (2,), (1,), 0, 2)])
    build_on_dict = legit[:-2] + pickle.EMPTY_DICT + _str("x") + _str("y") + pickle.SETITEM
    bad_build = build_on_dict + pickle.BUILD + pickle.SETITEMS + pickle.STOP
    path = save_torch_zip(tmp_path / "b.pth", {}, pickle_bytes=bad_build)
    with pytest.raises(UnsafePickleError):
        open_checkpoint(path)
    # Object-creating opcodes are refused even for an allowed class.
    newobj = (
        pickle.PROTO
        + b"\x02"
        + _global("collections", "OrderedDict")
        + pickle.EMPTY_TUPLE
        + pickle.NEWOBJ
        + pickle.STOP
    )
    path = save_torch_zip(tmp_path / "n.pth", {}, pickle_bytes=newobj)
    with pytest.raises(UnsafePickleError, match="NEWOBJ"):
        open_checkpoint(path)


def test_truncated_checkpoint(tmp_path, ref_dir):
    data = (ref_dir / "backbone.pth").read_bytes()
    path = tmp_path / "backbone.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def test_storage_shorter_than_its_tensor(tmp_path):
    data = state_dict_pickle([("w", np.float32, (4,), (1,), 0, 4)])
    path = tmp_path / "short.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("short/data.pkl", data)
        z.writestr("short/data/0", np.zeros(3, np.float32).tobytes())
    with pytest.raises(CheckpointError, match="holds 12 bytes, expected 16"):
        open_checkpoint(path).load("w")


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty"),
        (b"hello, not a checkpoint\n", "not a PyTorch checkpoint"),
        (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "legacy"),
        (b"\x93NUMPY\x01\x00", "not a PyTorch checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "archive.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="no <name>/data.pkl"):
        open_checkpoint(path)


def test_reads_safetensors(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(2, np.float16)}
    save_file(tensors, tmp_path / "m.safetensors")
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert sorted(ckpt.keys()) == ["x", "y"]
    for k, v in tensors.items():
        np.testing.assert_array_equal(np.array(ckpt.load(k)), v)
    # bfloat16 (numpy has none): written by the converter's writer, read back bit for bit
    from aim_mlx.convert.safetensors_writer import SafetensorsWriter

    bf16 = mx.array([[1.0, -2.5], [3.140625, 0.0]]).astype(mx.bfloat16)
    with SafetensorsWriter(tmp_path / "b.safetensors", [("w", bf16.dtype, bf16.shape)]) as w:
        w.write("w", bf16)
    back = open_checkpoint(tmp_path / "b.safetensors").load("w")
    assert back.dtype == mx.bfloat16 and mx.array_equal(back, bf16).item()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "m.safetensors").read_bytes()[:-4])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(cut)
