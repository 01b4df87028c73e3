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
    # BUILD sets only an OrderedDict's _metadata: applied to a tensor (with that state), or
    # with any other state, it is refused.
    legit = state_dict_pickle([("w", np.float32, (2,), (1,), 0, 2)])
    metadata = pickle.EMPTY_DICT + _str("_metadata") + pickle.EMPTY_DICT + pickle.SETITEM
    on_a_tensor = legit[:-2] + metadata + pickle.BUILD + pickle.SETITEMS + pickle.STOP
    other = pickle.EMPTY_DICT + _str("x") + _str("y") + pickle.SETITEM
    other_state = legit[:-1] + other + pickle.BUILD + pickle.STOP
    for data, target in ((on_a_tensor, "TensorInfo"), (other_state, "OrderedDict")):
        path = save_torch_zip(tmp_path / "b.pth", {}, pickle_bytes=data)
        with pytest.raises(UnsafePickleError, match=f"refusing BUILD on {target}$"):
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


DEEP = pickle.EMPTY_TUPLE + pickle.TUPLE1 * 300_000  # ((((),),),...): 300 KB
DEEP_KEYS = {
    "setitem": pickle.EMPTY_DICT + DEEP + pickle.NONE + pickle.SETITEM,
    "setitems": pickle.EMPTY_DICT + pickle.MARK + DEEP + pickle.NONE + pickle.SETITEMS,
    "dict": pickle.MARK + DEEP + pickle.NONE + pickle.DICT,
    "frozenset": pickle.MARK + DEEP + pickle.FROZENSET,
    "additems": pickle.EMPTY_SET + pickle.MARK + DEEP + pickle.ADDITEMS,
    "OrderedDict(pairs)": _global("collections", "OrderedDict")
    + DEEP
    + pickle.NONE
    + pickle.TUPLE2
    + pickle.TUPLE1
    + pickle.TUPLE1
    + pickle.REDUCE,
}


@pytest.mark.parametrize("kind", sorted(DEEP_KEYS))
def test_a_deeply_nested_key_is_refused_not_a_crash(tmp_path, kind):
    """Hashing a tuple nested 300,000 deep overflows the C stack: the process died (SIGSEGV)
    with no message. Dict keys and set items must be strings or ints; OrderedDict() takes no
    arguments (torch pickles its items after it)."""
    data = pickle.PROTO + b"\x04" + DEEP_KEYS[kind] + pickle.STOP
    path = save_torch_zip(tmp_path / "deep.pth", {}, pickle_bytes=data)
    code = (
        "import sys\nfrom aim_mlx.convert import open_checkpoint, UnsafePickleError\n"
        "try:\n    open_checkpoint(sys.argv[1])\nexcept UnsafePickleError as e:\n    print(e)"
    )
    run = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-500:]
    expected = (
        "refusing REDUCE on OrderedDict with arguments"
        if kind == "OrderedDict(pairs)"
        else "refusing a tuple as a dict key or set item: a state dict's keys are strings"
    )
    assert run.stdout == f"{path}: {expected}\n"


def test_a_value_nested_too_deep_for_its_repr_is_a_clean_error(tmp_path):
    """Messages show hostile values through their repr, which fails on deep nesting: that
    RecursionError escaped as a traceback where the pickle's own loop did not catch it."""
    from aim_mlx.convert.checkpoint import _short

    deep = []
    for _ in range(100_000):
        deep = [deep]
    assert _short(deep) == "a list nested too deep"
    data = pickle.PROTO + b"\x02" + pickle.EMPTY_LIST * 100_000 + pickle.APPEND * 99_999
    path = save_torch_zip(tmp_path / "deep.pth", {}, pickle_bytes=data + pickle.STOP)
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        open_checkpoint(path)
    path = save_torch_zip(
        tmp_path / "r.pth", {}, pickle_bytes=data + pickle.EMPTY_TUPLE + pickle.REDUCE + b"."
    )
    with pytest.raises(UnsafePickleError, match="refusing REDUCE on a list nested too deep"):
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
    with pytest.raises(CheckpointError, match="holds 12 bytes, expected 16: damaged or trunc"):
        open_checkpoint(path).load("w")


def test_a_view_past_its_storage_says_what_to_do(tmp_path):
    data = state_dict_pickle([("w", np.float32, (2,), (1,), 3, 4)])  # elements 3 and 4 of 4
    path = tmp_path / "past.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("past/data.pkl", data)
        z.writestr("past/data/0", np.zeros(4, np.float32).tobytes())
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path).load("w")
    assert str(e.value) == (
        f"{path}: tensor 'w' reaches past its storage: damaged; download or copy the file again"
    )


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


# Damaged files: CRC-32 of each record read, and clean errors for any zip damage.


def _flip(path, position: int, bit: int = 0):
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def _copy(ref_dir, tmp_path, name="backbone.pth"):
    path = tmp_path / name
    path.write_bytes((ref_dir / name).read_bytes())
    return path


@pytest.fixture
def crc_calls(monkeypatch):
    from aim_mlx.convert import checkpoint

    calls, real = [], checkpoint.crc32
    monkeypatch.setattr(checkpoint, "crc32", lambda *a: calls.append(1) or real(*a))
    return calls


def test_flipped_tensor_byte_is_a_crc_error_naming_the_record(ref_dir, tmp_path):
    from test_checkpoint_fuzz import record_spans

    path = _copy(ref_dir, tmp_path)
    ckpt = open_checkpoint(ref_dir / "backbone.pth")
    key = "trunk.blocks.3.mlp.fc1.weight"
    member = f"backbone/data/{ckpt.tensors[key].storage.key}"
    start, end = record_spans(path.read_bytes())[member]
    _flip(path, (start + end) // 2, bit=3)  # a mantissa bit: still a plausible float
    damaged = open_checkpoint(path)
    with pytest.raises(CheckpointError) as e:
        damaged.load(key)
    assert str(e.value) == (
        f"{path}: record {member} is corrupted (CRC-32 mismatch); download or copy the file again"
    )
    other = "trunk.blocks.3.mlp.fc2.weight"
    assert np.array_equal(np.array(damaged.load(other)), np.array(ckpt.load(other)))


def test_flipped_pickle_byte_is_a_crc_error(ref_dir, tmp_path):
    path = _copy(ref_dir, tmp_path)
    data = path.read_bytes()
    _flip(path, data.index(b"trunk.blocks.5.attn.qkv.weight") + 6, bit=0)  # "blocks" -> "clocks"
    with pytest.raises(CheckpointError, match=r"record backbone/data.pkl is corrupted \(CRC-32"):
        open_checkpoint(path)


def _views_checkpoint(path):
    """One float32 storage of 8 elements, read through two views: [3:5] and [0:2]."""
    specs = [("w", np.float32, (2,), (1,), 3, 8), ("v", np.float32, (2,), (1,), 0, 8)]
    storage = _global("torch", "FloatStorage")
    pkl = state_dict_pickle(specs).replace(storage + _str("1"), storage + _str("0"))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("views/data.pkl", pkl)
        z.writestr("views/data/0", np.arange(8, dtype=np.float32).tobytes())
    return path


def test_views_check_their_whole_storage_once(tmp_path, crc_calls):
    path = _views_checkpoint(tmp_path / "views.pth")
    ckpt = open_checkpoint(path)
    crc_calls.clear()
    assert np.array(ckpt.load("w")).tolist() == [3, 4]
    assert crc_calls  # the whole storage, although the view uses 2 of its 8 elements
    crc_calls.clear()
    assert np.array(ckpt.load("v")).tolist() == [0, 1]
    assert not crc_calls  # already checked

    data = path.read_bytes()
    last = data.index(np.arange(8, dtype=np.float32).tobytes()) + 7 * 4  # element 7: unused
    _flip(path, last)
    with pytest.raises(CheckpointError, match="record views/data/0 is corrupted"):
        open_checkpoint(path).load("w")


def test_verified_files_skip_the_crc(ref_dir, tmp_path, crc_calls):
    path = _copy(ref_dir, tmp_path, "head_best_layers.pth")
    key = "head.linear.weight"
    ckpt = open_checkpoint(path, verified=True)
    ckpt.load(key)
    assert not crc_calls
    open_checkpoint(path).load(key)
    assert crc_calls


def test_hub_downloads_are_converted_without_crc(tmp_path, monkeypatch, crc_calls, ref_dir):
    """hub.download checked the SHA-256, so the conversion from the hub does not add CRC-32s."""
    from conftest import FIXTURE_CONFIG

    from aim_mlx import hub, registry, resolve

    best = FIXTURE_CONFIG["variants"]["best"]
    spec = {
        "name": "aim-crc-test",
        "repo": "aim-test-org/AIM-crc",
        "backbone": {"filename": "backbone.pth", "sha256": "0" * 8},
        "heads": {v: {"filename": f"head_{v}.pth", "sha256": "0" * 8} for v in ("best", "last")},
        "probe_layers": {"best": best["probe_layers"], "last": best["probe_layers"]},
        "arch": FIXTURE_CONFIG["config"],
    }
    monkeypatch.setattr(registry, "_registered", {})
    registry.register(spec)
    monkeypatch.setenv("AIM_MLX_CACHE", str(tmp_path / "cache"))
    files = [ref_dir / "backbone.pth", ref_dir / best["head"]]
    monkeypatch.setattr(hub, "download", lambda *a, **k: files)
    out = resolve.resolve("aim-crc-test", progress=False)
    assert (out / "model.safetensors").is_file()
    assert not crc_calls
    probe = best["probe_layers"]
    convert(tmp_path / "local", backbone=files[0], head=files[1], num_heads=4, probe_layers=probe)
    assert crc_calls  # the same files given locally are checked


def test_inserted_zero_run_is_a_clean_error(ref_dir, tmp_path):
    """A run of zeros inserted after the pickle shifts every later record."""
    from test_checkpoint_fuzz import record_spans

    path = _copy(ref_dir, tmp_path, "head_best_layers.pth")
    data = path.read_bytes()
    end = record_spans(data)["head_best_layers/data.pkl"][1]
    path.write_bytes(data[:end] + bytes(32) + data[end:])
    with pytest.raises(CheckpointError) as e:
        ckpt = open_checkpoint(path)
        for key in ckpt.keys():
            ckpt.load(key)
    assert str(e.value).startswith(f"{path}: ")
    assert "download or copy the file again" in str(e.value)


def test_absurd_record_size_is_refused_before_reading(ref_dir, tmp_path, monkeypatch):
    path = _copy(ref_dir, tmp_path, "head_best_layers.pth")
    data = bytearray(path.read_bytes())
    entry = data.rindex(b"head_best_layers/data.pkl") - 46  # its central-directory entry
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 20 : entry + 28] = (0xFFFFFFF0).to_bytes(4, "little") * 2  # sizes: about 4 GB
    path.write_bytes(bytes(data))
    from aim_mlx.convert import checkpoint

    real_empty = checkpoint.np.empty

    def small_empty(n, *a, **k):
        assert n < 2**20, f"allocated {n} bytes"
        return real_empty(n, *a, **k)

    monkeypatch.setattr(checkpoint.np, "empty", small_empty)
    with pytest.raises(CheckpointError, match="holds 4294967280 bytes, more than the 4194304"):
        open_checkpoint(path)


def test_damaged_deflated_record_is_a_clean_error(tmp_path):
    path = tmp_path / "deflated.pth"
    specs = [("w", np.float32, (256,), (1,), 0, 256)]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("deflated/data.pkl", state_dict_pickle(specs))
        z.writestr("deflated/data/0", np.linspace(0, 1, 256, dtype=np.float32).tobytes())
    assert np.allclose(np.array(open_checkpoint(path).load("w")), np.linspace(0, 1, 256))
    data = path.read_bytes()
    _flip(path, data.index(b"deflated/data/0") + 40)  # inside the compressed tensor
    with pytest.raises(CheckpointError, match=f"{path}: damaged"):
        open_checkpoint(path).load("w")


@pytest.mark.parametrize(
    "header, message",
    [
        ([1, 2], "not a JSON object"),
        ({"x": "F32"}, "unsupported dtype None"),
        ({"x": {"dtype": "F32", "shape": [1]}}, "damaged data_offsets None"),
        ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, "4"]}}, "damaged data_offsets"),
    ],
)
def test_damaged_safetensors_header_is_a_clean_error(tmp_path, header, message):
    import json
    import struct

    raw = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(path)


def test_crc32_equals_zlib():
    """The fast CRC-32 (zlib-ng) gives zlib's values, whole and carried over pieces."""
    import zlib

    from aim_mlx.convert import checkpoint

    data = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 123, dtype=np.uint8).tobytes()
    for size in (0, 1, 4095, 2**20, len(data)):
        assert checkpoint.crc32(data[:size]) == zlib.crc32(data[:size]), size
    assert checkpoint.crc32(data[1000:], checkpoint.crc32(data[:1000])) == zlib.crc32(data)


def test_compressed_pickle_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    """A pickle record of a few KB that inflates to more than a state dict could need: never
    read into memory (the same way, 4 MB inflate to 4 GB)."""
    from aim_mlx.convert import checkpoint

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("bomb/data.pkl", "w") as f:
        f.write(state_dict_pickle([]))  # 32 bytes
        for _ in range(5):
            f.write(bytes(2**20))
    assert path.stat().st_size < 2**16
    real_empty = checkpoint.np.empty

    def small_empty(n, *a, **k):
        assert n < 2**20, f"allocated {n} bytes"
        return real_empty(n, *a, **k)

    monkeypatch.setattr(checkpoint.np, "empty", small_empty)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert str(e.value) == (
        f"{path}: its record bomb/data.pkl holds {5 * 2**20 + 32} bytes, more than the "
        "4194304 a state dict of weights could need: damaged, or not a checkpoint"
    )


@pytest.mark.parametrize("record", ["data.pkl", "byteorder"])
def test_a_large_stored_pickle_or_byteorder_is_refused_before_reading(
    tmp_path, monkeypatch, record
):
    """Records read whole are capped when stored too: a stored pickle could be most of a
    many-GB file, and unpickling takes many times its size (1-byte opcodes making lists)."""
    from aim_mlx.convert import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_PICKLE", 2**16)  # 4 MiB in use
    body = {
        "data.pkl": state_dict_pickle([])[:-1] + pickle.EMPTY_LIST * 2**17 + b".",
        "byteorder": b"little" + b" " * 2**17,
    }
    path = tmp_path / "big.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(
            "big/data.pkl", body["data.pkl"] if record == "data.pkl" else state_dict_pickle([])
        )
        z.writestr("big/byteorder", body["byteorder"] if record == "byteorder" else b"little")
    read = []
    real_read = checkpoint.TorchCheckpoint._read_record

    def reading(self, name, *args):
        read.append(name)
        return real_read(self, name, *args)

    monkeypatch.setattr(checkpoint.TorchCheckpoint, "_read_record", reading)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    size = len(body[record])
    limit = 2**16 if record == "data.pkl" else 16
    assert str(e.value) == (
        f"{path}: its record big/{record} holds {size} bytes, more than the {limit} a state "
        "dict of weights could need: damaged, or not a checkpoint"
    )
    assert read == (["big/byteorder"] if record == "data.pkl" else [])  # small: read


def test_a_view_with_more_elements_than_its_storage_is_refused(tmp_path):
    """Stride 0 would let 4 bytes in the file stand for a tensor of any size."""
    specs = [("w", np.float32, (10**5, 10**5), (0, 0), 0, 1)]
    path = tmp_path / "expand.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("expand/data.pkl", state_dict_pickle(specs))
        z.writestr("expand/data/0", bytes(4))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert str(e.value) == (
        f"{path}: a tensor of storage 0 has 10000000000 elements, more than its storage's 1: "
        "damaged, or not a state dict of weights"
    )


def test_hostile_values_are_cut_short_in_messages(tmp_path):
    huge_pid = pickle.PROTO + b"\x02" + pickle.MARK + _str("x") * 10**5 + pickle.LIST
    path = save_torch_zip(tmp_path / "p.pth", {}, pickle_bytes=huge_pid + pickle.BINPERSID + b".")
    with pytest.raises(UnsafePickleError) as e:
        open_checkpoint(path)
    assert str(e.value) == f"{path}: unexpected persistent id {repr(['x'] * 16)[:77]}..."


def test_a_view_reads_only_the_elements_it_spans(tmp_path, monkeypatch):
    """Four elements of a 4 MB storage: the rest streams through the CRC-32, never kept."""
    from aim_mlx.convert import checkpoint

    base = np.arange(2**20, dtype=np.float32)
    path = tmp_path / "view.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("view/data.pkl", state_dict_pickle([("v", np.float32, (4,), (3,), 10, 2**20)]))
        z.writestr("view/data/0", base.tobytes())
    real_empty = checkpoint.np.empty

    def small_empty(n, *a, **k):
        assert n <= checkpoint.CHUNK, f"allocated {n} bytes"
        return real_empty(n, *a, **k)

    monkeypatch.setattr(checkpoint.np, "empty", small_empty)
    monkeypatch.setattr(checkpoint, "CHUNK", 2**16)
    np.testing.assert_array_equal(np.array(open_checkpoint(path).load("v")), [10, 13, 16, 19])


@pytest.mark.parametrize("numel, stride", [(2**20, 1), (2**19, 2), (4, 1)])
def test_a_compressed_record_inflating_past_the_file_is_refused(
    tmp_path, monkeypatch, numel, stride
):
    """A zip bomb in a tensor's storage: 4 MB of zeros deflate to 4 KB. Refused before it is
    inflated (all of it would be, for its CRC-32, even for a tensor of 4 elements) when it takes
    more than the file's size and MAX_INFLATED (lowered here)."""
    from aim_mlx.convert import checkpoint

    monkeypatch.setattr(checkpoint, "MAX_INFLATED", 2**20)
    path = tmp_path / "bomb.pth"
    spec = ("w", np.float32, (numel,), (stride,), 0, 2**20)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bomb/data.pkl", state_dict_pickle([spec]))
        z.writestr("bomb/data/0", bytes(2**22))
    size = path.stat().st_size
    assert size < 2**14
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path).load("w")
    assert str(e.value) == (
        f"{path}: record bomb/data/0 inflates to {2**22} bytes, more than the whole file's "
        f"{size}: damaged, or a zip bomb"
    )


def test_two_records_of_one_name_are_refused(tmp_path):
    """zipfile reads the last of them, other readers may take the first: refused, not guessed."""
    path = tmp_path / "twice.pth"
    with zipfile.ZipFile(path, "w") as z, pytest.warns(UserWarning, match="Duplicate name"):
        z.writestr("twice/data.pkl", state_dict_pickle([("w", np.float32, (2,), (1,), 0, 2)]))
        z.writestr("twice/data/0", np.array([1, 2], np.float32).tobytes())
        z.writestr("twice/data/0", np.array([3, 4], np.float32).tobytes())
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert str(e.value) == (
        f"{path}: holds two records named 'twice/data/0': damaged or tampered with; "
        "download or copy the file again"
    )


def test_safetensors_header_nested_too_deep_is_a_clean_error(tmp_path):
    import struct

    raw = b"[" * 10**5 + b"]" * 10**5
    path = tmp_path / "deep.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CheckpointError, match="not a safetensors file \\(header is not JSON\\)"):
        open_checkpoint(path)


@pytest.mark.parametrize("into", [4096, 1])
def test_overlapping_records_are_refused(tmp_path, into):
    """A record whose bytes take in the next one's: all of it (a zip bomb that needs no
    compression: N such records make N times the file's size of tensors), or one byte of it."""
    import struct
    import zlib

    path = tmp_path / "overlap.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("overlap/data.pkl", state_dict_pickle([]))
        z.writestr("overlap/data/0", bytes(16))
        z.writestr("overlap/data/1", bytes(4096))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        first, second = z.getinfo("overlap/data/0"), z.getinfo("overlap/data/1")
    start = first.header_offset + 30 + len(first.filename) + len(first.extra)
    end = second.header_offset + 30 + len(second.filename) + len(second.extra) + 4096
    end = {4096: end, 1: second.header_offset + 1}[into]  # to the end, or one byte in
    entry = data.rindex(b"overlap/data/0") - 46  # its central-directory entry
    assert data[entry : entry + 4] == b"PK\x01\x02"
    data[entry + 16 : entry + 28] = struct.pack(  # CRC-32 and sizes: from its start to `end`
        "<III", zlib.crc32(bytes(data[start:end])), end - start, end - start
    )
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert len(z.read("overlap/data/0")) == end - start  # zipfile reads it as valid
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert str(e.value) == (
        f"{path}: records 'overlap/data/0' and 'overlap/data/1' overlap: damaged, or a zip "
        "bomb; download or copy the file again"
    )


def test_adjacent_records_with_non_ascii_names_are_not_overlaps(tmp_path):
    """Records end to end, with names of several bytes per character: no overlap is claimed."""
    path = tmp_path / "names.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("names/data.pkl", state_dict_pickle([]))
        for i in range(3):
            z.writestr(f"names/é-日本-{i}", bytes(10))
    open_checkpoint(path)  # no error


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
@pytest.mark.parametrize("record", ["data.pkl", "data/0"])
def test_an_encrypted_record_is_a_clean_error(tmp_path, compression, record):
    """zipfile asks for a password (a RuntimeError) where a record's encryption flag is set:
    torch.save never encrypts, so the file is refused, naming the record."""
    import struct

    path = tmp_path / "locked.pth"
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr("locked/data.pkl", state_dict_pickle([("w", np.float32, (4,), (1,), 0, 4)]))
        z.writestr("locked/data/0", np.arange(4, dtype=np.float32).tobytes())
    assert open_checkpoint(path).load("w").tolist() == [0, 1, 2, 3]
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(f"locked/{record}")
    central = data.rindex(info.filename.encode()) - 46  # its central-directory entry
    for at, flags in ((info.header_offset, 6), (central, 8)):  # local and central headers
        (bits,) = struct.unpack_from("<H", data, at + flags)
        struct.pack_into("<H", data, at + flags, bits | 1)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path).load("w")
    assert str(e.value) == (
        f"{path}: record locked/{record} is encrypted: damaged, or not a PyTorch checkpoint; "
        "download or copy the file again"
    )
