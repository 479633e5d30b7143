"""Datasets of the recipes: embedded synthetic data generated from a seed, and loaders for real local data.

Synthetic (no downloads; sample ``i`` of a split is a pure function of ``(seed, split, i)``):

- :class:`MovingShapes`: videos of 3-6 coloured shapes that move, bounce off the borders and occlude each other,
  with per-frame instance masks. Sample: ``{"video": (T, 3, H, W) float32 in [0, 1] (8-bit levels),
  "masks": (T, H, W) int64}``,
  mask 0 is the background, 1..n the objects (the same id in every frame).
- :class:`Shapes`: classification images of one shape (``SHAPE_CLASSES``) with a random colour, size (``radius``,
  a fraction of the image) and position (anywhere, or within ``jitter`` pixels of the centre) on a noisy background
  (``noise``, the standard deviation). Sample: ``{"image": (3, H, W) float32 in [0, 1] (8-bit levels), "label": () int64}``.

Real data (see :func:`open_video_data`, :func:`open_image_data`):

- video: a folder of videos, one sub-folder of frame images each (``<root>/<video>/*.png``, sorted by name),
  optionally with instance-mask images in ``<root>/<video>/masks/`` (same names; pixel value = instance id, 0 the
  background); or precomputed features in ``.npy`` / ``.pt``: an array ``(V, T, N, C)`` (``.pt`` also a dict with
  ``"features"`` and optionally ``"masks"`` ``(V, T, H, W)``). Features skip the recipe's patch encoder.
- images: an ImageFolder-style directory (``<root>/<class>/*.png``, classes sorted by name), or CIFAR-style arrays
  in ``.npz`` (``x``/``images``/``data``: ``(N, H, W, 3)`` uint8 or ``(N, 3, H, W)``; ``y``/``labels``: ``(N,)``).

:class:`Batches` turns a dataset into the batch of a training step: a pure function of the step, so a resumed
run sees the same batches as an uninterrupted one, and each DDP rank takes its own slice of the global batch.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "ring", "cross")
# Saturated, well separated hues: distinct objects should be distinguishable by colour as well as by shape.
_HUES = torch.linspace(0.0, 1.0, 13)[:-1]


def _generator(seed: int, split: str, index: int) -> torch.Generator:
    key = zlib.crc32(f"{seed}/{split}/{index}".encode())
    return torch.Generator().manual_seed(key)


def _uniform(g: torch.Generator, lo: float, hi: float, *shape: int) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape or (1,), generator=g)


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """(n,) hue, saturation, value in [0, 1] -> (n, 3) RGB."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _shape_mask(kind: str, y: Tensor, x: Tensor, cy: Tensor, cx: Tensor, r: Tensor) -> Tensor:
    """Boolean mask of a shape of radius r centred at (cy, cx) on the pixel grid (y, x); broadcasts over frames."""
    dy, dx = (y - cy) / r, (x - cx) / r
    if kind == "circle":
        return dy**2 + dx**2 <= 1.0
    if kind == "square":
        return (dy.abs() <= 0.8) & (dx.abs() <= 0.8)
    if kind == "triangle":
        return (dy <= 0.7) & (dy >= 2.0 * dx.abs() - 1.0)
    if kind == "diamond":
        return dy.abs() + dx.abs() <= 1.0
    if kind == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= 1.0) & (d2 >= 0.3)
    if kind == "cross":
        return ((dy.abs() <= 0.3) & (dx.abs() <= 1.0)) | ((dx.abs() <= 0.3) & (dy.abs() <= 1.0))
    raise ValueError(f"unknown shape {kind!r}")


def _bounce(start: Tensor, velocity: Tensor, t: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Position at times t of a point moving at constant velocity, reflected at lo and hi (a triangle wave)."""
    span = (hi - lo).clamp_min(1e-6)
    p = (start - lo + velocity * t) % (2 * span)
    return lo + torch.where(p > span, 2 * span - p, p)


class _Generated(torch.utils.data.Dataset):
    """A dataset of ``num_samples`` samples drawn from (seed, split, index) by ``_generate``, kept in its 8-bit
    form after first use when ``cache`` is set; ``_sample`` turns that form into the returned dict."""

    num_samples: int
    cache: bool
    _cache: dict

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"{type(self).__name__} index {index} out of range [0, {self.num_samples})")
        stored = self._cache.get(index) or self._generate(index)
        if self.cache:
            self._cache[index] = stored
        return self._sample(*stored)


class MovingShapes(_Generated):
    """Synthetic multi-object video with ground-truth instance masks (see the module docstring).

    Args:
        num_samples: length of the split (samples are generated on demand, nothing is stored).
        num_frames: T. size: H = W in pixels. objects: (min, max) shapes per video.
        seed, split: sample i of (seed, split) is always the same video; use another split for held-out data.
        cache: keep the samples generated (16 KiB per 4-frame 32x32 clip), so epochs after the first are free.
    """

    def __init__(self, num_samples: int = 2000, num_frames: int = 4, size: int = 32, objects: tuple[int, int] = (3, 6),
                 seed: int = 0, split: str = "train", cache: bool = True):
        if num_samples < 1 or num_frames < 1 or size < 8 or not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"MovingShapes: need num_samples >= 1, num_frames >= 1, size >= 8 and 1 <= min objects"
                             f" <= max objects; got {num_samples}, {num_frames}, {size}, {objects}")
        self.num_samples, self.num_frames, self.size, self.objects = num_samples, num_frames, size, objects
        self.seed, self.split, self.cache = seed, split, cache
        self._cache: dict[int, tuple[Tensor, Tensor]] = {}

    def _sample(self, video: Tensor, masks: Tensor) -> dict[str, Tensor]:
        return {"video": video.float() / 255.0, "masks": masks.long()}

    def _generate(self, index: int) -> tuple[Tensor, Tensor]:
        """(T, 3, H, W) uint8 frames and (T, H, W) uint8 masks of sample ``index``."""
        g = _generator(self.seed, self.split, index)
        T, S = self.num_frames, float(self.size)
        n = int(torch.randint(self.objects[0], self.objects[1] + 1, (1,), generator=g))
        y = torch.arange(self.size, dtype=torch.float32).view(1, -1, 1) + 0.5
        x = torch.arange(self.size, dtype=torch.float32).view(1, 1, -1) + 0.5
        t = torch.arange(T, dtype=torch.float32).view(-1, 1, 1)
        background = _uniform(g, 0.05, 0.25, 3)
        video = background.view(1, 3, 1, 1).expand(T, 3, self.size, self.size).clone()
        masks = torch.zeros(T, self.size, self.size, dtype=torch.long)
        hues = _HUES[torch.randperm(len(_HUES), generator=g)[:n]]
        colours = _hsv_to_rgb(hues, _uniform(g, 0.6, 1.0, n), _uniform(g, 0.7, 1.0, n))
        for obj in range(n):  # painted back to front: later shapes occlude earlier ones
            kind = SHAPE_CLASSES[int(torch.randint(len(SHAPE_CLASSES), (1,), generator=g))]
            r = _uniform(g, 0.1 * S, 0.18 * S)
            lo, hi = r, S - r
            cy, cx = _uniform(g, float(lo), float(hi)), _uniform(g, float(lo), float(hi))
            speed, angle = _uniform(g, 0.03 * S, 0.08 * S), _uniform(g, 0.0, 2 * math.pi)
            cy = _bounce(cy, speed * torch.sin(angle), t, lo, hi)
            cx = _bounce(cx, speed * torch.cos(angle), t, lo, hi)
            inside = _shape_mask(kind, y, x, cy, cx, r)  # (T, H, W)
            masks[inside] = obj + 1
            video = torch.where(inside[:, None], colours[obj].view(1, 3, 1, 1), video)
        noise = 0.02 * torch.randn(video.shape, generator=g)
        # Stored as 8-bit, like real frames: a cached sample is the same as a regenerated one, and small.
        return ((video + noise).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8), masks.to(torch.uint8)


class Shapes(_Generated):
    """Synthetic classification images: which of ``SHAPE_CLASSES`` is drawn (see the module docstring)."""

    num_classes = len(SHAPE_CLASSES)

    def __init__(self, num_samples: int = 10_000, size: int = 32, seed: int = 0, split: str = "train",
                 cache: bool = True, noise: float = 0.3, radius: tuple[float, float] = (0.12, 0.3),
                 jitter: float | None = None):
        if num_samples < 1 or size < 8 or noise < 0 or not 0 < radius[0] <= radius[1] <= 0.5 or (jitter or 0) < 0:
            raise ValueError(f"Shapes: need num_samples >= 1, size >= 8, noise >= 0, 0 < radius <= 0.5 and jitter "
                             f">= 0; got {num_samples}, {size}, {noise}, {radius}, {jitter}")
        self.num_samples, self.size, self.seed, self.split, self.cache = num_samples, size, seed, split, cache
        self.noise, self.radius, self.jitter = noise, radius, jitter
        self._cache: dict[int, tuple[Tensor, int]] = {}

    def _sample(self, image: Tensor, label: int) -> dict[str, Tensor]:
        return {"image": image.float() / 255.0, "label": torch.tensor(label)}

    def _generate(self, index: int) -> tuple[Tensor, int]:
        g = _generator(self.seed, self.split, index)
        S = float(self.size)
        label = int(torch.randint(len(SHAPE_CLASSES), (1,), generator=g))
        y = torch.arange(self.size, dtype=torch.float32).view(-1, 1) + 0.5
        x = torch.arange(self.size, dtype=torch.float32).view(1, -1) + 0.5
        r = _uniform(g, self.radius[0] * S, self.radius[1] * S)
        if self.jitter is None:  # anywhere inside the image
            cy, cx = _uniform(g, float(r), float(S - r)), _uniform(g, float(r), float(S - r))
        else:  # within +-jitter pixels of the centre
            cy, cx = S / 2 + _uniform(g, -self.jitter, self.jitter), S / 2 + _uniform(g, -self.jitter, self.jitter)
        inside = _shape_mask(SHAPE_CLASSES[label], y, x, cy, cx, r)
        colour = _hsv_to_rgb(_uniform(g, 0.0, 1.0), _uniform(g, 0.5, 1.0), _uniform(g, 0.6, 1.0))[0]
        # The default noise makes small shapes hard enough to tell apart that the gini recipe's runs can differ.
        image = _uniform(g, 0.0, 0.5, 3).view(3, 1, 1) + self.noise * torch.randn(3, self.size, self.size, generator=g)
        image = torch.where(inside, colour.view(3, 1, 1), image)
        return (image.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8), label


class TensorDataset(torch.utils.data.Dataset):
    """Samples as dicts of the rows of some tensors (real data loaded into memory)."""

    def __init__(self, **tensors: Tensor):
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all arrays must have the same length, got {({k: len(t) for k, t in tensors.items()})}")
        self.tensors = tensors
        self.num_classes = int(tensors["label"].max()) + 1 if "label" in tensors else None

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {k: t[index] for k, t in self.tensors.items()}


def split(dataset: TensorDataset, held_out: float = 0.1, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """A seeded (train, held-out) split of in-memory real data; at least one sample on each side."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"need at least 2 samples to hold some out, got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = min(max(1, round(n * held_out)), n - 1)
    return (TensorDataset(**{key: t[order[k:]] for key, t in dataset.tensors.items()}),
            TensorDataset(**{key: t[order[:k]] for key, t in dataset.tensors.items()}))


# ---------------------------------------------------------------------------------------------------------------
# Real data


def check_finite(tensor: Tensor, where: str) -> Tensor:
    """``tensor`` unchanged, or a ValueError naming ``where`` and the first NaN/Inf: a model trained on it would
    only diverge later, far from the cause."""
    if tensor.is_floating_point():
        bad = ~torch.isfinite(tensor)
        if bad.any():
            index = tuple(int(i) for i in np.unravel_index(int(bad.flatten().nonzero()[0]), tuple(tensor.shape)))
            raise ValueError(f"--data: {where} holds non-finite values ({int(bad.sum())} of {tensor.numel()}), the "
                             f"first {tensor[index].item()} at index {list(index)} of shape {list(tensor.shape)}")
    return tensor


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data: {what} not found at {str(path)!r}")
    return path


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:160] if lines else ''}"


def _read_image(path: Path, size: int | None, mode: str = "RGB") -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError(f"reading image files ({path}) needs Pillow: pip install pillow") from exc
    try:
        with Image.open(path) as image:
            image = image.convert(mode)
            if size is not None and image.size != (size, size):
                image = image.resize((size, size), Image.NEAREST if mode != "RGB" else Image.BILINEAR)
            return np.asarray(image)
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for truncated or foreign files
        raise ValueError(f"--data: cannot read the image {str(path)!r} ({_first_line(exc)})") from exc


def _read_arrays(path: Path) -> dict:
    """The arrays of a .npz, .npy or .pt file, read eagerly; a ValueError naming the file for any unreadable one."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                return {k: arrays[k] for k in arrays.files}
        if path.suffix == ".npy":
            return {"features": np.load(path, allow_pickle=False)}
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, garbled or pickled files are all the same user error
        kind = "a torch" if path.suffix == ".pt" else f"an {path.suffix}"
        raise ValueError(f"--data: cannot read {str(path)!r} as {kind} file ({_first_line(exc)})") from exc
    return content if isinstance(content, dict) else {"features": content}


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _to_chw_float(images, what: str, size: int | None = None) -> Tensor:
    """(N, H, W, 3) or (N, 3, H, W) uint8 or float -> (N, 3, H, W) float32 in [0, 1], resized to size x size."""
    x = torch.as_tensor(images)
    if x.dim() != 4 or 3 not in (x.shape[1], x.shape[-1]):
        raise ValueError(f"--data: {what} must be images (N, H, W, 3) or (N, 3, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    x = check_finite(x.float() / 255.0 if x.dtype == torch.uint8 else x.float(), what).contiguous()
    if size is not None and x.shape[-2:] != (size, size):
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x


def _labels(values, what: str, count: int) -> Tensor:
    labels = torch.as_tensor(values)
    if labels.is_floating_point() or labels.dtype == torch.bool or labels.numel() != count:
        raise ValueError(f"--data: {what} must be {count} integer class labels (one per image), got "
                         f"{labels.dtype} of shape {tuple(labels.shape)}")
    labels = labels.reshape(-1).long()
    if len(labels) and int(labels.min()) < 0:
        raise ValueError(f"--data: {what} holds a negative class label ({int(labels.min())}) at index "
                         f"{int(labels.argmin())}; labels are 0 .. classes - 1")
    return labels


def open_image_data(path: str | Path, size: int = 32) -> TensorDataset:
    """Real classification data: an ImageFolder-style directory or a CIFAR-style ``.npz`` (module docstring), the
    images resized to ``size`` x ``size``."""
    path = _existing(path, "image data")
    if path.is_dir():
        classes = sorted(p for p in path.iterdir() if p.is_dir())
        files = [(f, label) for label, folder in enumerate(classes) for f in _images_in(folder)]
        if not files:
            raise ValueError(f"--data: {str(path)!r} has no <class>/<image> files ({', '.join(IMAGE_SUFFIXES)})")
        _enough(len(files), path, "image", "images")
        images = np.stack([_read_image(f, size) for f, _ in files])
        return TensorDataset(image=_to_chw_float(images, str(path)), label=torch.tensor([label for _, label in files]))
    if path.suffix != ".npz":
        raise ValueError(f"--data: expected an image directory or a .npz file, got {str(path)!r}")
    arrays = _read_arrays(path)
    x_key = next((k for k in ("x", "images", "data") if k in arrays), None)
    y_key = next((k for k in ("y", "labels") if k in arrays), None)
    if x_key is None or y_key is None:
        raise ValueError(f"--data: {str(path)!r} needs arrays x/images/data and y/labels, has {list(arrays)}")
    _enough(len(arrays[x_key]), path, "image", "images")
    images = _to_chw_float(arrays[x_key], f"{path}:{x_key}", size)
    return TensorDataset(image=images, label=_labels(arrays[y_key], f"{path}:{y_key}", len(images)))


def _enough(count: int, path: Path, one: str, many: str) -> None:
    """Every recipe holds some of its --data out (``split``): fewer than 2 samples is a user error about the file."""
    if count < 2:
        held = f"holds no {many}" if count == 0 else f"holds 1 {one}"
        raise ValueError(f"--data: {str(path)!r} {held}; at least 2 are needed (training samples and a held-out set)")


def _clips(array: Tensor, num_frames: int) -> Tensor:
    """(V, T_total, ...) -> (V * (T_total // num_frames), num_frames, ...): consecutive non-overlapping clips."""
    per_video = array.shape[1] // num_frames
    if per_video == 0:
        raise ValueError(f"--data: videos have {array.shape[1]} frames, fewer than the clip length {num_frames}")
    array = array[:, : per_video * num_frames]
    return array.reshape(array.shape[0] * per_video, num_frames, *array.shape[2:])


def _frame_folders(path: Path, size: int) -> dict[str, Tensor]:
    videos = sorted(p for p in path.iterdir() if p.is_dir())
    if not videos:
        raise ValueError(f"--data: {str(path)!r} has no <video>/<frame> sub-folders")
    with_masks = [v for v in videos if (v / "masks").is_dir()]
    if with_masks and len(with_masks) != len(videos):
        missing = next(v for v in videos if v not in with_masks)
        raise ValueError(f"--data: {str(missing / 'masks')!r} is missing (other videos have masks: all or none)")
    frames, masks = [], []
    for video in videos:
        files = _images_in(video)
        if not files:
            raise ValueError(f"--data: {str(video)!r} holds no frame images ({', '.join(IMAGE_SUFFIXES)})")
        frames.append(np.stack([_read_image(f, size) for f in files]))
        if with_masks:
            absent = next((f.name for f in files if not (video / "masks" / f.name).is_file()), None)
            if absent is not None:
                raise ValueError(f"--data: no mask {str(video / 'masks' / absent)!r} for the frame of that name")
            masks.append(np.stack([_read_image(video / "masks" / f.name, size, "L") for f in files]))
    length = min(len(f) for f in frames)
    tensors = {"video": torch.stack([_to_chw_float(f[:length], str(path)) for f in frames])}
    if masks:
        tensors["masks"] = torch.stack([torch.as_tensor(m[:length]).long() for m in masks])
    return tensors


def _feature_file(path: Path) -> dict[str, Tensor]:
    content = _read_arrays(path)
    if "features" not in content:
        raise ValueError(f"--data: {str(path)!r} has no 'features' entry (has {list(content)})")
    features = torch.as_tensor(content["features"])
    if features.dim() != 4 or not (features.is_floating_point() or features.dtype == torch.uint8):
        raise ValueError(f"--data: {str(path)!r}: features must be a float array (V, T, N, C), got "
                         f"{features.dtype} of shape {tuple(features.shape)}")
    tensors = {"features": check_finite(features.float(), f"{path}:features")}
    if "masks" in content:
        masks = torch.as_tensor(content["masks"])
        if masks.dim() != 4 or masks.shape[:2] != features.shape[:2] or masks.is_floating_point():
            raise ValueError(f"--data: {str(path)!r}: masks must be integer (V, T, H, W) with the features' V, T = "
                             f"{tuple(features.shape[:2])}, got {masks.dtype} of shape {tuple(masks.shape)}")
        tensors["masks"] = masks.long()
    return tensors


def open_video_data(path: str | Path, num_frames: int = 4, size: int = 32) -> TensorDataset:
    """Real video: a folder of frame folders (optional masks/), or features in .npy/.pt (module docstring).

    Returns samples with ``video`` (T, 3, H, W) or ``features`` (T, N, C), and ``masks`` (T, H, W) when given.
    """
    path = _existing(path, "video data")
    if path.is_dir():
        tensors = _frame_folders(path, size)
    elif path.suffix in (".npy", ".pt"):
        tensors = _feature_file(path)
    else:
        raise ValueError(f"--data: expected a frame directory, .npy or .pt, got {str(path)!r}")
    clips = {k: _clips(t, num_frames) for k, t in tensors.items()}
    _enough(len(next(iter(clips.values()))), path, f"clip of {num_frames} frames", f"clips of {num_frames} frames")
    return TensorDataset(**clips)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def collate(samples: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


class Batches:
    """The batch of training step ``s``: a pure function of ``s`` (so resuming needs no loader state).

    The samples are visited in a seeded random order, a new permutation each epoch; the global batch of a step is
    ``batch_size`` consecutive samples of that order, and rank ``r`` of ``world`` takes its ``r``-th slice.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self._orders: dict[int, Tensor] = {}

    def _order(self, epoch: int) -> Tensor:
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(zlib.crc32(f"order/{self.seed}/{epoch}".encode()))
            # Keep two epochs: a batch that straddles an epoch boundary reads both.
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._orders[epoch]

    def indices(self, step: int, rank: int = 0, world: int = 1) -> list[int]:
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} must be divisible by the world size {world}")
        share = self.batch_size // world
        n = len(self.dataset)
        positions = range(step * self.batch_size + rank * share, step * self.batch_size + (rank + 1) * share)
        return [int(self._order(p // n)[p % n]) for p in positions]

    def __call__(self, step: int, rank: int = 0, world: int = 1) -> dict[str, Tensor]:
        return collate([self.dataset[i] for i in self.indices(step, rank, world)])


def evaluation_batches(dataset, batch_size: int, limit: int | None = None):
    """Consecutive batches of the first ``limit`` samples (all by default), in order."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, n, batch_size):
        yield collate([dataset[i] for i in range(start, min(n, start + batch_size))])
