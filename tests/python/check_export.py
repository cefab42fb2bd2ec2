#!/usr/bin/env python3
"""Checks a `pipeline export` .pth without PyTorch, with CPython's own unpickler: the archive is
laid out as torch.save lays it out (data.pkl, data/<i> stored uncompressed at 64-byte offsets,
version 3, byteorder little), data.pkl unpickles to an OrderedDict of
torch._utils._rebuild_tensor_v2 calls on ('storage', torch.FloatStorage, key, 'cpu', numel)
persistent ids, and its tensors equal, bit for bit, those of a reference checkpoint written by
PyTorch itself (read the same way, its DataParallel `module.` dropped), under the reference's
names (torchvision's: `downsample`, `fc`) or kuangliu/pytorch-cifar's (`shortcut`, `linear`).

    python3 check_export.py EXPORTED.pth REFERENCE.pth torchvision|kuangliu [f16]

With `f16` the export is `--dtype f16`: HalfStorage tensors, each the reference's rounded to
float16 by numpy (round to nearest, ties to even), bit for bit.

Prints a JSON summary on success; exits non-zero with the reason otherwise.
"""

import collections
import json
import pickle
import sys
import zipfile

import numpy as np

DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
          "LongStorage": np.int64}


class Storage:
    def __init__(self, key, dtype):
        self.key, self.dtype = key, dtype


def rebuild(storage, offset, size, stride, requires_grad, hooks, *rest):
    data = storage.data
    item = data.itemsize
    return np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=[s * item for s in stride]).copy()


def read(path):
    """The state dict of a torch.save zip file (or the dict under 'model'), as numpy arrays."""
    z = zipfile.ZipFile(path)
    pkl = [n for n in z.namelist() if n.endswith("/data.pkl")]
    assert len(pkl) == 1, f"{path}: data.pkl entries {pkl}"
    folder = pkl[0][: -len("data.pkl")]

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("collections", "OrderedDict"):
                return collections.OrderedDict
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return rebuild
            if module == "torch" and name in DTYPES:
                return name
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")

        def persistent_load(self, pid):
            tag, cls, key, location, numel = pid
            assert tag == "storage", pid
            s = Storage(key, DTYPES[cls])
            s.data = np.frombuffer(z.read(f"{folder}data/{key}"), dtype="<" + np.dtype(s.dtype).str[1:])
            assert s.data.size == numel, (pid, s.data.size)
            return s

    obj = Unpickler(z.open(pkl[0])).load()
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    return z, folder, obj


def main():
    exported, reference, naming = sys.argv[1], sys.argv[2], sys.argv[3]
    want = np.float16 if sys.argv[4:] == ["f16"] else np.float32
    bits = np.uint16 if want == np.float16 else np.uint32
    z, folder, ours = read(exported)
    infos = {i.filename: i for i in z.infolist()}
    assert z.read(folder + "version") == b"3\n", z.read(folder + "version")
    assert z.read(folder + "byteorder") == b"little"
    misaligned = []
    for name, info in infos.items():
        assert info.compress_type == zipfile.ZIP_STORED, f"{name} is compressed"
        if "/data/" in name:
            # The entry's data starts after its local header (30 bytes, name, extra field).
            with open(exported, "rb") as f:
                f.seek(info.header_offset + 26)
                n, m = np.frombuffer(f.read(4), dtype="<u2")
            start = info.header_offset + 30 + int(n) + int(m)
            if start % 64:
                misaligned.append(name)
    assert not misaligned, f"entries not at 64-byte offsets: {misaligned}"
    assert isinstance(ours, collections.OrderedDict), type(ours)
    _, _, ref = read(reference)
    ref = {k: v for k, v in ref.items() if not k.endswith("num_batches_tracked")}
    if naming == "kuangliu":
        assert "linear.weight" in ours and "fc.weight" not in ours, sorted(ours)
        assert not any(".downsample." in k for k in ours), sorted(ours)
        assert any(".shortcut." in k for k in ours), sorted(ours)
        mapped = {("fc." + k[len("linear."):] if k.startswith("linear.") else k)
                  .replace(".shortcut.", ".downsample."): v for k, v in ours.items()}
    else:
        assert naming == "torchvision", naming
        mapped = dict(ours)
    strip = lambda k: k[len("module."):] if k.startswith("module.") else k  # noqa: E731
    ref = {strip(k): v for k, v in ref.items()}
    assert sorted(mapped) == sorted(ref), (sorted(set(mapped) ^ set(ref)))
    for k, v in ref.items():
        w = mapped[k]
        assert w.dtype == want and w.shape == v.shape, (k, w.dtype, w.shape, v.shape)
        assert np.array_equal(w.view(bits), v.astype(want).view(bits)), k
    print(json.dumps({"tensors": len(ours), "names": sorted(ours)[:3], "entries": len(infos)}))


if __name__ == "__main__":
    main()
