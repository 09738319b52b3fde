"""Datasets as whole uint8 tensors: one spec string names a set plus modifiers.

Spec grammar: ``name``, ``name[mod=val,...]`` or ``npz:/path/file.npz[mods]``.
Modifiers (applied in this order): ``labels=0-4`` / ``labels=1,7``, ``n=1000``,
``channels=1|3``, ``size=32``, ``brightness=0.6`` (pixels × factor, clamped; paper 004 §3.2),
``mix=paper|equal`` (``overall`` only). Synthetic sets are drawn at ``size`` (not drawn at 28
and resized). ``overall`` is paper 004's mixed OOD set (§5.1, ``overall_parts``): images drawn
uniformly from the paper's OOD sets, one noise set among them, built at ``size`` (natural sets
resized, noise and constant drawn at that size); labels = source index.
Everything is held as one N×C×H×W uint8 tensor so
training code batches by slicing on the device, with no DataLoader.
"""
from __future__ import annotations

import difflib
import functools
import io
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


class DataError(ValueError):
    """Any user-facing data problem (bad spec, missing files, malformed arrays)."""


@dataclass(frozen=True)
class SetInfo:
    """What a config checks against before any compute (``TrialConfig.check_data``)."""

    n: int  # number of images
    shape: tuple[int, int, int]  # (C, H, W)
    classes: tuple[int, ...]  # sorted distinct labels; () for an unlabeled set


@dataclass(frozen=True)
class ImageSet:
    x: torch.Tensor  # uint8, N×C×H×W, contiguous
    y: torch.Tensor | None  # int64 (N,), or None
    name: str  # the spec it came from

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: str | torch.device) -> ImageSet:
        return replace(self, x=self.x.to(device), y=None if self.y is None else self.y.to(device))

    @property
    def shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (c, h, w)

    def info(self) -> SetInfo:
        classes = () if self.y is None else tuple(int(c) for c in torch.unique(self.y).tolist())
        return SetInfo(len(self), self.shape, classes)


_IDX = {"fashion_mnist": "FashionMNIST", "mnist": "MNIST", "notmnist": "notMNIST"}
_TV = {"emnist_letters": "EMNIST/raw", "kmnist": "KMNIST/raw", "cifar10": "cifar-10-batches-py", "svhn": "svhn"}
_SYNTH = ("gaussian_noise", "uniform_noise", "constant", "blobs")
_NAMES = sorted([*_IDX, *_TV, *_SYNTH, "omniglot", "overall"])
_MODS = ("labels", "n", "channels", "size", "brightness", "mix")
MIXES = ("paper", "equal")
# Paper 004 §5.1, Fashion-MNIST: 1,000 images of each of MNIST, KMNIST, NotMNIST, Omniglot, SVHN,
# CelebA, LSUN, CIFAR-10 (natural, 8 sets), noise (uniform pixels, its Fig. 7b) and constant.
# CelebA and LSUN have no loader here; KMNIST, SVHN and CIFAR-10 join where on disk (or downloadable).
OVERALL_REQUIRED = ("mnist", "notmnist", "omniglot")
OVERALL_OPTIONAL = ("kmnist", "svhn[channels=1]", "cifar10[channels=1]")
OVERALL_PAPER_NATURAL = 8  # natural sets in the paper's mix: they fill 8 of its 10 shares
OVERALL_SYNTH = ("uniform_noise", "constant")  # the paper's noise and constant sets, one share each
OVERALL_EQUAL_SYNTH = ("gaussian_noise", "uniform_noise", "constant")  # mix=equal: every offline noise set
OVERALL_EACH = 1000
_SYNTH_N = 10_000
HOLDOUT_SEED = 12345  # fixed, not the trial seed: every trial of a study validates on the same images
_FIX = ("Set OODLAB_DATA_DIR to a folder with the torchvision layout (e.g. ../shared/data), "
        "or run on a machine with internet.")


def data_root() -> Path:
    """$OODLAB_DATA_DIR if set, else ~/.cache/oodlab (read at call time, not import)."""
    return Path(os.environ.get("OODLAB_DATA_DIR") or "~/.cache/oodlab").expanduser()


def names() -> list[str]:
    """Registered base dataset names (``npz:PATH`` is accepted in addition)."""
    return list(_NAMES)


def _download_allowed() -> bool:
    return os.environ.get("OODLAB_DOWNLOAD", "1") != "0"


# ---------------------------------------------------------------- spec parsing

def _parse_labels(v: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in v.split(","):
        a, sep, b = part.strip().partition("-")
        if not a.strip().isdecimal() or (sep and not b.strip().isdecimal()):
            raise DataError(f"bad labels value {v!r}: use e.g. labels=0-4 or labels=1,7")
        lo, hi = int(a), int(b) if sep else int(a)
        if hi < lo:
            raise DataError(f"bad labels range {part!r}: end is below start")
        out.extend(range(lo, hi + 1))
    return tuple(sorted(set(out)))


def _parse_int(k: str, v: str, allowed: tuple[int, ...] | None = None) -> int:
    if not v.strip().isdecimal() or int(v) < 1:
        raise DataError(f"bad value {k}={v!r}: must be a positive integer")
    if allowed and int(v) not in allowed:
        raise DataError(f"bad value {k}={v!r}: must be one of {allowed}")
    return int(v)


def _parse_brightness(k: str, v: str) -> float:
    try:
        b = float(v)
    except ValueError:
        raise DataError(f"bad value {k}={v!r}: must be a number") from None
    if not 0 <= b <= 100:
        raise DataError(f"bad value {k}={v!r}: must be in [0, 100]")
    return b


def _parse_mix(k: str, v: str) -> str:
    if v not in MIXES:
        raise DataError(f"bad value {k}={v!r}: must be one of {', '.join(MIXES)}")
    return v


# modifier -> parser of its value (``k``: its name, for messages)
_MOD_PARSERS: dict[str, Callable[[str, str], Any]] = {
    "labels": lambda k, v: _parse_labels(v), "n": _parse_int, "channels": lambda k, v: _parse_int(k, v, (1, 3)),
    "size": _parse_int, "brightness": _parse_brightness, "mix": _parse_mix}


def _split_modifiers(spec: str) -> tuple[str, dict[str, str]]:
    """``name[mod=val,…]`` -> (name, raw modifier values); a value may hold commas (labels=1,7)."""
    spec, body = spec.strip(), ""
    if "[" in spec or "]" in spec:
        i = spec.rfind("[")
        if i < 0 or not spec.endswith("]"):
            raise DataError(f"bad spec {spec!r}: modifiers must be a trailing [mod=val,...]")
        spec, body = spec[:i], spec[i + 1 : -1]
    raw: dict[str, str] = {}
    last = None
    for tok in (t.strip() for t in body.split(",")) if body.strip() else ():
        if "=" not in tok:  # e.g. the "7" of labels=1,7
            if last is None or not tok:
                raise DataError(f"bad modifier {tok!r} in {spec!r}: expected mod=val")
            raw[last] += "," + tok
            continue
        k, v = (s.strip() for s in tok.split("=", 1))
        if k not in _MODS:
            raise DataError(f"unknown modifier {k!r}; known: {', '.join(_MODS)}")
        if k in raw:
            raise DataError(f"modifier {k!r} given twice")
        raw[k], last = v, k
    return spec, raw


def _check_name(spec: str, mods: dict) -> None:
    """DataError for an unknown dataset name (with close matches) or modifiers it cannot take."""
    if spec not in _NAMES:
        close = difflib.get_close_matches(spec, _NAMES, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise DataError(f"unknown dataset {spec!r}.{hint} Known: {', '.join(_NAMES)}, npz:PATH")
    if spec in (*_SYNTH, "overall") and "labels" in mods:
        raise DataError(f"{spec} has no labels, so labels= cannot be used")
    if "mix" in mods and spec != "overall":
        raise DataError(f"mix= applies to overall only, not {spec}")


def _parse(spec: str) -> tuple[str, Path | None, dict]:
    """Split a spec into (name, npz path or None, checked modifiers); touches no files."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty dataset spec {spec!r}")
    spec, raw = _split_modifiers(spec)
    mods = {k: _MOD_PARSERS[k](k, raw[k]) for k in _MODS if k in raw}
    if spec.startswith("npz:"):
        if not spec[4:]:
            raise DataError("npz spec needs a path: npz:/path/to/file.npz")
        return "npz", Path(spec[4:]).expanduser(), mods
    _check_name(spec, mods)
    return spec, None, mods


def sources(spec: str) -> set[tuple[str, tuple[int, ...] | None]]:
    """The underlying datasets of a spec as (source, labels or None): ``overall`` expands to its
    parts, ``npz:`` to its resolved path; n/channels/size/brightness do not change the source."""
    name, path, mods = _parse(spec)
    if name == "overall":
        return set().union(*(sources(s) for s in (*OVERALL_REQUIRED, *OVERALL_OPTIONAL, *OVERALL_EQUAL_SYNTH)))
    return {(f"npz:{path.resolve()}" if path is not None else name, mods.get("labels"))}


def share_source(a: str, b: str) -> bool:
    """Whether specs ``a`` and ``b`` can hold images of one distribution: a common source whose
    label sets are not both given and disjoint (``mnist[brightness=2]`` shares mnist; ``fashion_mnist[labels=0]``
    and ``fashion_mnist[labels=1]`` do not share)."""
    return any(sa == sb and (la is None or lb is None or bool(set(la) & set(lb)))
               for sa, la in sources(a) for sb, lb in sources(b))


def base_name(spec: str) -> str:
    """The registered name a spec starts from (``npz`` for ``npz:`` files), e.g. ``overall[size=32]`` -> ``overall``."""
    return _parse(spec)[0]


def takes_shape(spec: str) -> bool:
    """Whether ``spec`` is a synthetic set with no ``channels=``/``size=``, so ``at_shape`` may set them."""
    name, _, mods = _parse(spec)
    return name in _SYNTH and "channels" not in mods and "size" not in mods


def at_size(spec: str, size: int) -> str:
    """``spec`` built at ``size``×``size``: ``size=`` added unless given (synthetic sets and ``overall``'s
    noise are then drawn at that size, natural images resized), e.g. ``constant`` -> ``constant[size=32]``."""
    _, _, mods = _parse(spec)
    if "size" in mods:
        return spec
    return f"{spec[:-1]},size={size}]" if spec.endswith("]") else f"{spec}[size={size}]"


def at_shape(spec: str, shape: tuple[int, int, int]) -> str:
    """``spec`` generated at (C, H, W) when ``takes_shape(spec)``, e.g. ``blobs`` -> ``blobs[channels=3,size=32]``."""
    if not takes_shape(spec):
        return spec
    c, h, _ = shape
    mods = f"channels={c},size={h}"
    return f"{spec[:-1]},{mods}]" if spec.endswith("]") else f"{spec}[{mods}]"


def validate(spec: str) -> None:
    """Check a spec before any compute; reads no data (npz: only checks the file exists)."""
    name, path, _ = _parse(spec)
    if path is not None and not path.is_file():
        raise DataError(f"npz file not found: {path}")


# ---------------------------------------------------------------- loaders

def _read_idx(path: Path) -> np.ndarray:
    """Read an uncompressed IDX (MNIST-format) file of uint8 data."""
    buf = path.read_bytes()
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] != 0x08:
        raise DataError(f"{path} is not an uncompressed uint8 IDX file")
    ndim = buf[3]
    dims = np.frombuffer(buf, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(buf, dtype=np.uint8, offset=4 + 4 * ndim).reshape(*dims)


def _missing(name: str, split: str, path: Path, why: str) -> DataError:
    return DataError(f"{name} ({split} split) not found: looked for {path}. {why} {_FIX}")


def _tv_dataset(name: str, root: Path, train: bool, download: bool) -> Any:
    import torchvision.datasets as tvd  # lazy: only needed for these sets

    r = str(root)
    if name == "fashion_mnist":
        return tvd.FashionMNIST(r, train=train, download=download)
    if name == "mnist":
        return tvd.MNIST(r, train=train, download=download)
    if name == "emnist_letters":
        return tvd.EMNIST(r, split="letters", train=train, download=download)
    if name == "kmnist":
        return tvd.KMNIST(r, train=train, download=download)
    if name == "cifar10":
        return tvd.CIFAR10(r, train=train, download=download)
    return tvd.SVHN(str(root / "svhn"), split="train" if train else "test", download=download)


def _download(name: str, split: str, root: Path, where: Path) -> Any:
    """Fetch via torchvision when allowed; otherwise say where we looked and how to fix it."""
    if not _download_allowed():
        raise _missing(name, split, where, "Download is off (OODLAB_DOWNLOAD=0).")
    try:
        return _tv_dataset(name, root, split == "train", True)
    except Exception as e:
        raise _missing(name, split, where, f"Download failed ({type(e).__name__}: {e}).") from e


def _load_idx(name: str, split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    raw = root / _IDX[name] / "raw"
    prefix = "train" if split == "train" else "t10k"
    img, lab = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if not (img.is_file() and lab.is_file()):
        if name == "notmnist":
            raise _missing(name, split, img, "notMNIST cannot be downloaded.")
        _download(name, split, root, img)
    x, y = _read_idx(img), _read_idx(lab)
    return torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64))


def _load_tv(name: str, split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    train = split == "train"
    try:
        ds = _tv_dataset(name, root, train, False)
    except Exception:  # noqa: BLE001 - torchvision raises various errors for a missing/partial copy: fetch it
        ds = _download(name, split, root, root / _TV[name])
    x = torch.as_tensor(np.asarray(ds.data))
    y = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets), dtype=torch.int64)
    if name == "emnist_letters":
        x = x.transpose(1, 2)  # torchvision's EMNIST images are stored transposed
    x = x.unsqueeze(1) if x.ndim == 3 else x
    if x.shape[-1] == 3:  # CIFAR is N×H×W×C
        x = x.permute(0, 3, 1, 2)
    return x.contiguous(), y


@functools.lru_cache(maxsize=4)
def _decode_omniglot(zpath: str) -> tuple[np.ndarray, np.ndarray]:
    """Decode a zip of 105×105 PNGs to inverted 28×28 uint8; cached since it takes ~1 s."""
    from PIL import Image

    imgs: list[np.ndarray] = []
    labels: list[int] = []
    alphabets: dict[str, int] = {}
    with zipfile.ZipFile(zpath) as z:
        for member in sorted(n for n in z.namelist() if n.endswith(".png")):
            alphabet = member.split("/")[-3]
            im = Image.open(io.BytesIO(z.read(member))).convert("L")
            im = Image.eval(im, lambda p: 255 - p).resize((28, 28), Image.Resampling.LANCZOS)
            imgs.append(np.asarray(im, dtype=np.uint8))
            labels.append(alphabets.setdefault(alphabet, len(alphabets)))
    return np.stack(imgs)[:, None], np.asarray(labels, dtype=np.int64)


def _load_omniglot(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    zpath = root / "omniglot" / f"images_background_small{1 if split == 'train' else 2}.zip"
    if not zpath.is_file():
        raise _missing("omniglot", split, zpath, "Omniglot small sets are not downloaded automatically.")
    x, y = _decode_omniglot(str(zpath))
    return torch.from_numpy(x.copy()), torch.from_numpy(y.copy())


def _synthetic(name: str, split: str, n: int, c: int, size: int) -> torch.Tensor:
    """Deterministic noise images; the seed depends on name and split only (a copy of a cached draw:
    every trial of a process, and every replicate, scores the same validation sets)."""
    return _synthetic_draw(name, split, n, c, size).clone()


@functools.lru_cache(maxsize=8)
def _synthetic_draw(name: str, split: str, n: int, c: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{split}".encode()))
    shape = (n, c, size, size)
    if name == "gaussian_noise":
        return (torch.randn(shape, generator=g) * 0.25 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
    if name == "uniform_noise":
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if name == "blobs":
        return blobs(shape, g)
    return torch.randint(0, 256, (n, 1, 1, 1), generator=g, dtype=torch.uint8).expand(shape).contiguous()


def blobs(shape: tuple[int, int, int, int], g: torch.Generator) -> torch.Tensor:
    """Amorphous binary shapes with sharp edges, the "Blobs" validation-OOD set of Hendrycks et al.
    (Outlier Exposure, ICLR 2019, App. B): Bernoulli(0.7) pixels, Gaussian blur (σ = 1.5 px),
    thresholded at 0.75. Simple images like these get high likelihood under image VAEs."""
    n, c, h, w = shape
    x = torch.bernoulli(torch.full((n * c, h, w), 0.7), generator=g)
    x = _blur_matrix(h).T @ x @ _blur_matrix(w)  # the separable blur as two matmuls: 3.5-6x faster than conv2d
    return (x >= 0.75).to(torch.uint8).mul(255).view(n, c, h, w).contiguous()


def _blur_matrix(m: int, sigma: float = 1.5, radius: int = 4) -> torch.Tensor:
    """(m, m) matrix of a 1-D Gaussian blur with reflect padding: row i is what pixel i gives to
    each output pixel (the blur applied to the i-th basis vector)."""
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-r.pow(2) / (2 * sigma**2))
    eye = torch.eye(m).unsqueeze(1)  # (m, 1, m): one basis vector per row
    return F.conv1d(F.pad(eye, (radius, radius), mode="reflect"), (k / k.sum()).view(1, 1, -1)).squeeze(1)


def _load_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not path.is_file():
        raise DataError(f"npz file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise DataError(f"could not read {path} as .npz: {e}") from e
    if "x" not in arrays:
        raise DataError(f"{path} has no array 'x' (found: {sorted(arrays)})")
    x = arrays["x"]
    if x.dtype != np.uint8:
        raise DataError(f"{path}: x must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{path}: x must be N×H×W, N×H×W×C or N×C×H×W with C in (1, 3), got shape {x.shape}")
    y = None
    if "y" in arrays:
        yy = arrays["y"]
        if yy.ndim != 1 or len(yy) != len(x):
            raise DataError(f"{path}: y must have shape ({len(x)},), got {yy.shape}")
        if not np.issubdtype(yy.dtype, np.integer):
            raise DataError(f"{path}: y must be integer, got {yy.dtype}")
        y = torch.from_numpy(yy.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x)), y


def overall_counts(natural: int, mix: str = "paper", each: int = OVERALL_EACH) -> tuple[list[int], list[int]]:
    """Images per part of ``overall`` given ``natural`` available natural sets: (per natural set, per synthetic set).

    ``paper``: the paper's shares, noise and constant ``each`` images each (1/10 of the mix) and the
    natural sets sharing the other 8·``each`` equally, however many of them are available, so an
    offline mix weighs noise and constant as the paper's does. ``equal``: ``each`` of every available
    set (``OVERALL_EQUAL_SYNTH``: three synthetic sets).
    """
    if natural < 1:
        raise DataError("overall needs at least one natural OOD set")
    if mix == "equal":
        return [each] * natural, [each] * len(OVERALL_EQUAL_SYNTH)
    total = OVERALL_PAPER_NATURAL * each
    return [total // natural + (i < total % natural) for i in range(natural)], [each] * len(OVERALL_SYNTH)


def _overall_natural(split: str, root: Path, size: int) -> list[tuple[int, torch.Tensor]]:
    """(part index, images) of every available natural part of ``overall``; required ones must exist."""
    out = []
    for i, spec in enumerate((*OVERALL_REQUIRED, *OVERALL_OPTIONAL)):
        try:
            x = load(at_size(spec, size), split, root).x
        except DataError:
            if spec in OVERALL_REQUIRED:
                raise
            continue  # optional sets join only where they are on disk (or downloadable)
        out.append((i, x))
    return out


def _load_overall(split: str, root: Path, mix: str, size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper 004's "overall" set (``overall_counts``), each part drawn at random without replacement,
    shuffled; labels = part index (natural parts first, then the synthetic ones)."""
    size = size or 28
    natural = _overall_natural(split, root, size)
    synth = OVERALL_SYNTH if mix == "paper" else OVERALL_EQUAL_SYNTH
    n_nat, n_syn = overall_counts(len(natural), mix)
    first_synth = len(OVERALL_REQUIRED) + len(OVERALL_OPTIONAL)
    parts = [(i, x, n) for (i, x), n in zip(natural, n_nat)]
    for j, (spec, n) in enumerate(zip(synth, n_syn)):
        parts.append((first_synth + j, load(at_size(spec, size), split, root).x, n))
    xs, ys = [], []
    for i, x, n in parts:
        if n > len(x):
            raise DataError(f"overall: part {i} has {len(x)} {split} images, fewer than the {n} its share needs")
        xs.append(x[torch.randperm(len(x), generator=torch.Generator().manual_seed(i))[:n]])
        ys.append(torch.full((n,), i, dtype=torch.int64))
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x[order].contiguous(), y[order]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images (N, C, H, W) -> (N, C, size, size), bilinear with antialiasing (as torchvision's
    ``transforms.Resize`` on PIL images, which paper 004's authors use for 28 -> 32), rounded."""
    if x.shape[-2:] == (size, size):
        return x
    out = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _read(spec: str, name: str, path: Path | None, mods: dict, split: str, root: Path
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images and labels of a parsed spec as stored (or generated), before any modifier."""
    if name in _SYNTH:  # n, channels, size set the generated shape
        return _synthetic(name, split, mods.get("n", _SYNTH_N), mods.get("channels", 1), mods.get("size", 28)), None
    if name == "npz":
        if path is None:
            raise DataError(f"{spec!r}: npz needs a path, e.g. npz:/data/x.npz")
        return _load_npz(path)
    if name in _IDX:
        return _load_idx(name, split, root)
    if name == "omniglot":
        return _load_omniglot(split, root)
    if name == "overall":
        return _load_overall(split, root, mods.get("mix", "paper"), mods.get("size"))
    return _load_tv(name, split, root)


def _select(spec: str, name: str, mods: dict, split: str, x: torch.Tensor, y: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images the labels= and n= modifiers keep (n: a fixed-seed draw)."""
    if "labels" in mods:
        if y is None:
            raise DataError(f"{spec}: labels= needs labels, but this set has none")
        keep = torch.isin(y, torch.tensor(mods["labels"]))
        if not keep.any():
            raise DataError(f"{spec}: no images with labels {list(mods['labels'])} (present: {y.unique().tolist()})")
        x, y = x[keep], y[keep]
    if "n" in mods and name not in _SYNTH:
        if mods["n"] > len(x):
            raise DataError(f"{spec}: n={mods['n']} but the {split} split has only {len(x)} images")
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[: mods["n"]]
        x, y = x[idx], None if y is None else y[idx]
    return x, y


def _transform(spec: str, mods: dict, x: torch.Tensor, pad_to: int | None) -> torch.Tensor:
    """The channels=, size= and brightness= modifiers, then zero padding to ``pad_to``."""
    if mods.get("channels") == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif mods.get("channels") == 1 and x.shape[1] == 3:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8)
    if "size" in mods:
        x = resize(x, mods["size"])
    if "brightness" in mods:
        x = (x.float() * mods["brightness"]).round().clamp(0, 255).to(torch.uint8)
    if pad_to is not None:
        h, w = x.shape[-2:]
        if h > pad_to or w > pad_to:
            raise DataError(f"{spec}: images are {h}×{w}, larger than pad_to={pad_to}")
        top, left = (pad_to - h) // 2, (pad_to - w) // 2
        x = F.pad(x, (left, pad_to - w - left, top, pad_to - h - top))
    return x


def load(spec: str, split: str = "test", root: str | Path | None = None, *,
         pad_to: int | None = None, device: str | torch.device = "cpu") -> ImageSet:
    """Load a whole dataset split as one uint8 N×C×H×W tensor on `device`."""
    name, path, mods = _parse(spec)
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    x, y = _read(spec, name, path, mods, split, Path(root).expanduser() if root is not None else data_root())
    x, y = _select(spec, name, mods, split, x, y)
    x = _transform(spec, mods, x, pad_to)
    return ImageSet(x.contiguous().to(device), None if y is None else y.to(device), spec)


def holdout(s: ImageSet, n: int) -> tuple[ImageSet, ImageSet]:
    """Split ``s`` into (rest, held out): ``n`` images drawn with the fixed ``HOLDOUT_SEED``, so the
    held-out part depends only on the set and ``n``; the rest keeps its original order."""
    if not 1 <= n < len(s):
        raise DataError(f"{s.name}: cannot hold out {n} of its {len(s)} images (need 1 <= n < {len(s)})")
    order = torch.randperm(len(s), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).to(s.x.device)
    held = order[:n]
    keep = torch.ones(len(s), dtype=torch.bool, device=s.x.device)
    keep[held] = False

    def part(idx: torch.Tensor) -> ImageSet:
        return ImageSet(s.x[idx].contiguous(), None if s.y is None else s.y[idx], s.name)

    return part(keep.nonzero().squeeze(1)), part(held)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1]; done per batch on the device to save memory."""
    if x.dtype != torch.uint8:
        raise DataError(f"to_float expects uint8 pixels, got {x.dtype}")
    return x.to(torch.float32).div_(255.0)


def batch_indices(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                  device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
    """Yield index tensors covering range(n) once; callers slice device tensors with them."""
    if n < 0 or batch_size < 1:
        raise DataError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if shuffle:
        gdev = generator.device if generator is not None else "cpu"
        order = torch.randperm(n, generator=generator, device=gdev).to(device or "cpu")
    else:
        order = torch.arange(n, device=device)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]
