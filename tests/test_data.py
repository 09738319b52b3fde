"""Tests for oodlab.data against the real offline data at $OODLAB_DATA_DIR."""
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from oodlab import data, naming
from oodlab.data import DataError, ImageSet

ROOT = Path(os.environ["OODLAB_DATA_DIR"])  # set by conftest.py


@pytest.fixture(autouse=True)
def _root(monkeypatch):
    monkeypatch.setenv("OODLAB_DATA_DIR", str(ROOT))
    monkeypatch.setenv("OODLAB_DOWNLOAD", "0")  # tests must never reach the network


def _mean(ds: ImageSet) -> float:
    return data.to_float(ds.x).mean().item()


def test_fashion_mnist_train_and_test():
    tr = data.load("fashion_mnist", "train")
    assert tr.x.shape == (60000, 1, 28, 28) and tr.x.dtype == torch.uint8 and tr.x.is_contiguous()
    assert tr.y.dtype == torch.int64 and tr.y.shape == (60000,)
    assert tr.y[:8].tolist() == [9, 0, 0, 3, 0, 2, 7, 2]
    assert abs(_mean(tr) - 0.2860) < 1e-3
    assert len(tr) == 60000 and tr.shape == (1, 28, 28) and tr.name == "fashion_mnist"
    te = data.load("fashion_mnist")  # default split is test
    assert te.x.shape == (10000, 1, 28, 28)
    assert abs(_mean(te) - 0.2868) < 1e-3


def test_mnist_and_notmnist_test():
    m = data.load("mnist", "test")
    assert m.x.shape == (10000, 1, 28, 28)
    assert m.y[:8].tolist() == [7, 2, 1, 0, 4, 1, 4, 9]
    assert abs(_mean(m) - 0.1325) < 1e-3
    nm = data.load("notmnist")
    assert nm.x.shape == (10000, 1, 28, 28) and set(nm.y.unique().tolist()) == set(range(10))
    assert abs(_mean(nm) - 0.4266) < 1e-3


def test_omniglot():
    te, tr = data.load("omniglot", "test"), data.load("omniglot", "train")
    assert te.x.shape == (3120, 1, 28, 28) and te.x.dtype == torch.uint8
    assert len(tr) == 2720 and te.y.shape == (3120,)
    assert _mean(te) < 0.5 and _mean(tr) < 0.5  # inverted: dark background, bright strokes
    assert te.x.max().item() > 200
    border = torch.cat([te.x[..., 0, :], te.x[..., -1, :]]).float().mean().item()
    assert border < 10  # background is dark at the edges
    again = data.load("omniglot", "test")  # cached decode must hand out independent tensors
    again.x.zero_()
    assert data.load("omniglot", "test").x.max().item() > 200


def test_labels_modifier():
    ds = data.load("mnist[labels=0-4]")
    assert set(ds.y.unique().tolist()) == {0, 1, 2, 3, 4}
    assert len(ds) == int((data.load("mnist").y < 5).sum())
    ds = data.load("mnist[labels=1,7]")
    assert set(ds.y.unique().tolist()) == {1, 7}
    ds = data.load("mnist[labels=1,7,n=50]")
    assert len(ds) == 50 and set(ds.y.tolist()) <= {1, 7}
    with pytest.raises(DataError, match="no images with labels"):
        data.load("mnist[labels=42]")


def test_n_modifier_is_deterministic_subset():
    a, b = data.load("mnist[n=100]"), data.load("mnist[n=100]")
    full = data.load("mnist")
    assert len(a) == 100 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.y, full.y[:100])  # shuffled, not the first 100
    idx = torch.randperm(10000, generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(a.x, full.x[idx])
    with pytest.raises(DataError, match="only 10000"):
        data.load("mnist[n=20000]")


def test_pad_to_32():
    ds = data.load("mnist[n=20]", pad_to=32)
    assert ds.x.shape == (20, 1, 32, 32)
    inner = data.load("mnist[n=20]").x
    assert torch.equal(ds.x[..., 2:30, 2:30], inner)
    border = ds.x.clone()
    border[..., 2:30, 2:30] = 0
    assert border.sum().item() == 0
    with pytest.raises(DataError, match="larger than pad_to"):
        data.load("mnist[n=2]", pad_to=20)


def test_channels_and_size():
    ds = data.load("mnist[n=10,channels=3]")
    assert ds.shape == (3, 28, 28) and torch.equal(ds.x[:, 0], ds.x[:, 2])
    back = data.load("mnist[n=10,channels=3]").x.float().mean(1, keepdim=True).round().to(torch.uint8)
    assert torch.equal(back, data.load("mnist[n=10,channels=1]").x)
    big = data.load("mnist[n=10,size=32]")
    assert big.x.shape == (10, 1, 32, 32) and big.x.dtype == torch.uint8
    assert abs(_mean(big) - _mean(data.load("mnist[n=10]"))) < 0.02  # resize keeps brightness
    both = data.load("fashion_mnist[n=5,channels=3,size=32]")
    assert both.x.shape == (5, 3, 32, 32)


def test_synthetic_sets():
    for name in ["gaussian_noise", "uniform_noise", "constant"]:
        a, b = data.load(name, "test"), data.load(name, "test")
        tr = data.load(name, "train")
        assert a.x.shape == (10000, 1, 28, 28) and a.x.dtype == torch.uint8 and a.y is None
        assert torch.equal(a.x, b.x) and not torch.equal(a.x, tr.x)
    g = data.load("gaussian_noise").x.float() / 255
    assert abs(g.mean().item() - 0.5) < 0.01 and 0.2 < g.std().item() < 0.25  # 0.25 minus clipping
    u = data.load("uniform_noise").x
    assert u.min().item() == 0 and u.max().item() == 255
    c = data.load("constant[n=50]").x
    assert len(c) == 50 and (c == c[:, :, :1, :1]).all() and c[:, 0, 0, 0].unique().numel() > 10
    s = data.load("uniform_noise[n=7,channels=3,size=32]")
    assert s.x.shape == (7, 3, 32, 32)
    with pytest.raises(DataError, match="no labels"):
        data.load("gaussian_noise[labels=1]")


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 8, 9), dtype=np.uint8)  # canonical N×C×H×W
    stored = {"nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1), "nchw": x}[layout]
    p = tmp_path / "d.npz"
    np.savez(p, x=stored, y=np.arange(6, dtype=np.int32))
    ds = data.load(f"npz:{p}")
    want = x[:, :1] if layout == "nhw" else x
    assert torch.equal(ds.x, torch.from_numpy(want)) and ds.x.is_contiguous()
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == list(range(6))
    assert data.load(f"npz:{p}[labels=2-3]").y.tolist() == [2, 3]


def test_npz_without_y(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 28, 28), np.uint8))
    ds = data.load(f"npz:{p}", pad_to=32)
    assert ds.y is None and ds.x.shape == (4, 1, 32, 32)


@pytest.mark.parametrize("arrays,msg", [
    ({"z": np.zeros((2, 4, 4), np.uint8)}, "no array 'x'"),
    ({"x": np.zeros((2, 4, 4), np.float32)}, "must be uint8, got float32"),
    ({"x": np.zeros((2, 4), np.uint8)}, "got shape"),
    ({"x": np.zeros((2, 5, 4, 4), np.uint8)}, "got shape"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "y must have shape"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(2, np.float32)}, "y must be integer"),
])
def test_npz_errors(tmp_path, arrays, msg):
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    with pytest.raises(DataError, match=msg):
        data.load(f"npz:{p}")


def test_npz_missing_file(tmp_path):
    p = tmp_path / "nope.npz"
    with pytest.raises(DataError, match="not found") as e:
        data.load(f"npz:{p}")
    assert str(p) in str(e.value)
    with pytest.raises(DataError, match="not found"):
        data.validate(f"npz:{p}")


def test_unknown_name_suggests():
    with pytest.raises(DataError) as e:
        data.load("fashion_mnsit")
    assert "Did you mean fashion_mnist" in str(e.value) and "omniglot" in str(e.value)
    assert issubclass(DataError, ValueError)


@pytest.mark.parametrize("name,split,rel", [
    ("fashion_mnist", "train", "FashionMNIST/raw/train-images-idx3-ubyte"),
    ("mnist", "test", "MNIST/raw/t10k-images-idx3-ubyte"),
    ("notmnist", "test", "notMNIST/raw/t10k-images-idx3-ubyte"),
    ("omniglot", "test", "omniglot/images_background_small2.zip"),
    ("emnist_letters", "test", "EMNIST/raw"),
    ("kmnist", "train", "KMNIST/raw"),
    ("cifar10", "test", "cifar-10-batches-py"),
    ("svhn", "test", "svhn"),
])
def test_missing_data_names_path(tmp_path, monkeypatch, name, split, rel):
    monkeypatch.setenv("OODLAB_DATA_DIR", str(tmp_path))
    assert data.data_root() == tmp_path
    with pytest.raises(DataError) as e:
        data.load(name, split)
    msg = str(e.value)
    assert str(tmp_path / rel) in msg and "OODLAB_DATA_DIR" in msg and name in msg


def test_offline_mnist_train_is_clear_error():
    with pytest.raises(DataError, match="mnist \\(train split\\) not found") as e:
        data.load("mnist", "train")
    assert str(ROOT / "MNIST/raw/train-images-idx3-ubyte") in str(e.value)


@pytest.mark.parametrize("spec,msg", [
    ("mnist[foo=1]", "unknown modifier 'foo'"),
    ("mnist[n=0]", "positive integer"),
    ("mnist[n=abc]", "positive integer"),
    ("mnist[channels=2]", "one of"),
    ("mnist[size=-3]", "positive integer"),
    ("mnist[labels=a-b]", "bad labels"),
    ("mnist[labels=4-1]", "below start"),
    ("mnist[n=1,n=2]", "given twice"),
    ("mnist[7]", "expected mod=val"),
    ("mnist[n=1", "trailing"),
    ("", "empty"),
    ("npz:", "needs a path"),
    ("cifar100", "unknown dataset"),
    ("constant[labels=1]", "no labels"),
])
def test_validate_rejects_bad_specs(tmp_path, monkeypatch, spec, msg):
    monkeypatch.setenv("OODLAB_DATA_DIR", str(tmp_path / "empty"))  # no files: must not need them
    with pytest.raises(DataError, match=msg):
        data.validate(spec)


def test_validate_accepts_good_specs_without_files(tmp_path, monkeypatch):
    monkeypatch.setenv("OODLAB_DATA_DIR", str(tmp_path / "empty"))
    for spec in ["mnist", "cifar10[n=10]", "fashion_mnist[labels=1,7,n=100,channels=3,size=32]",
                 "svhn[labels=0-4, 8]", "gaussian_noise[size=32,channels=3]", "mnist[]"]:
        data.validate(spec)
    assert not (tmp_path / "empty").exists()
    assert data.names() == sorted(data.names()) and {"mnist", "omniglot", "svhn"} <= set(data.names())


def test_load_bad_split():
    with pytest.raises(DataError, match="split"):
        data.load("uniform_noise", "val")


def test_to_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8)
    f = data.to_float(x)
    assert f.dtype == torch.float32 and torch.allclose(f, torch.tensor([0.0, 0.2, 1.0]))
    with pytest.raises(DataError):
        data.to_float(f)


def test_batch_indices():
    g = torch.Generator().manual_seed(1)
    batches = list(data.batch_indices(1003, 100, shuffle=True, generator=g))
    assert [len(b) for b in batches] == [100] * 10 + [3]
    allidx = torch.cat(batches)
    assert torch.equal(allidx.sort().values, torch.arange(1003))
    assert not torch.equal(allidx, torch.arange(1003))
    g2 = torch.Generator().manual_seed(1)
    assert torch.equal(torch.cat(list(data.batch_indices(1003, 100, shuffle=True, generator=g2))), allidx)
    plain = list(data.batch_indices(5, 2, shuffle=False))
    assert [b.tolist() for b in plain] == [[0, 1], [2, 3], [4]]
    assert list(data.batch_indices(0, 4, shuffle=True)) == []
    with pytest.raises(DataError):
        list(data.batch_indices(5, 0, shuffle=False))


def test_imageset_to_and_device():
    ds = data.load("uniform_noise[n=4]", device="cpu")
    moved = ds.to("cpu")
    assert moved.x.device.type == "cpu" and torch.equal(moved.x, ds.x) and moved.name == ds.name
    assert ds.shape == (1, 28, 28) and len(ds) == 4
    if torch.cuda.is_available():
        g = data.load("uniform_noise[n=4]", device="cuda")
        assert g.x.is_cuda and torch.equal(g.x.cpu(), ds.x)


def test_failed_download_is_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OODLAB_DOWNLOAD", "1")

    def offline(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(data, "_tv_dataset", offline)  # stand-in for torchvision with no internet
    for name in ["fashion_mnist", "kmnist"]:
        with pytest.raises(DataError, match="Download failed \\(RuntimeError: no network\\)") as e:
            data.load(name, "train", root=tmp_path)
        assert str(tmp_path) in str(e.value)


def test_split_specs_keeps_modifier_commas():
    assert naming.split_specs("mnist,uniform_noise[channels=3,size=32], npz:/a/b.npz") == [
        "mnist", "uniform_noise[channels=3,size=32]", "npz:/a/b.npz"]


def test_at_size_base_name_and_mix_modifier():
    assert data.at_size("constant", 32) == "constant[size=32]"
    assert data.at_size("blobs[channels=1]", 32) == "blobs[channels=1,size=32]"
    assert data.at_size("mnist[size=28]", 32) == "mnist[size=28]"  # an explicit size wins
    assert data.base_name("overall[mix=equal,size=32]") == "overall" and data.base_name("mnist") == "mnist"
    noise = data.load("uniform_noise[n=50,size=32]").x.float()
    assert noise.shape == (50, 1, 32, 32) and (noise[..., 1:] - noise[..., :-1]).abs().mean() > 80  # drawn, not resized
    for bad, match in (("overall[mix=half]", "mix"), ("constant[mix=paper]", "overall only")):
        with pytest.raises(data.DataError, match=match):
            data.validate(bad)
