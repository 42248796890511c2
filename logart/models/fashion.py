"""Two small CNNs that logart trains on Fashion-MNIST itself (fixed seed, cached), for labelled accuracy offline:

    fashion-vit         a timm VisionTransformer: 4 x 4 patches, width 96, 4 blocks of 3 heads (trained 5
                        epochs, about 5 minutes)
    fashion-resnet      ResNet-style: a conv-BN-ReLU stem, three stages of torchvision BasicBlocks (16, 32, 64
                        channels), global pooling, a linear classifier
    fashion-mobilenet   MobileNetV2-style, the hard case: torchvision InvertedResiduals (1x1 expand, 3x3
                        depthwise, 1x1 project, ReLU6), a 1x1 head conv, global pooling, a linear classifier

`fashion_model(name)` returns the trained network in eval mode, training it on the first call (about a minute
on 2 cores) and caching its weights (safetensors) and test accuracy under `$LOGART_CACHE/fashion/`, keyed on
the architecture, the training settings and the torch version. `logart train-fashion NAME` does the same from
the command line.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from logart.errors import LogartError


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), act(inplace=True))


class FashionResNet(nn.Module):
    def __init__(self, widths=(16, 32, 64), classes: int = 10):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        self.stem = _conv_bn(1, widths[0])
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None if stride == 1 and cin == w else nn.Sequential(
                nn.Conv2d(cin, w, 1, stride, bias=False), nn.BatchNorm2d(w))
            stages.append(BasicBlock(cin, w, stride, down))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


class FashionMobileNet(nn.Module):
    # (expansion, output channels, stride) of each inverted residual
    SETTINGS = ((1, 16, 1), (4, 24, 2), (4, 24, 1), (4, 32, 2), (4, 32, 1), (4, 48, 1))

    def __init__(self, classes: int = 10, head: int = 128):
        super().__init__()
        from torchvision.models.mobilenetv2 import InvertedResidual

        self.stem = _conv_bn(1, 16, act=nn.ReLU6)
        blocks, cin = [], 16
        for t, c, s in self.SETTINGS:
            blocks.append(InvertedResidual(cin, c, s, t))
            cin = c
        self.blocks = nn.Sequential(*blocks)
        self.head = _conv_bn(cin, head, k=1, act=nn.ReLU6)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(head, classes))

    def forward(self, x):
        return self.classifier(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def FashionViT(classes: int = 10, embed_dim: int = 96, depth: int = 4, num_heads: int = 3) -> nn.Module:
    """A small timm VisionTransformer on 28 x 28 images: 4 x 4 patches (49 tokens and a class token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=classes, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=4.0)


ARCHS = {"fashion-resnet": FashionResNet, "fashion-mobilenet": FashionMobileNet, "fashion-vit": FashionViT}


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    batch: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 2


# Per-model training settings that differ from TrainConfig's: a ViT needs more epochs and more weight decay.
TRAINING = {"fashion-vit": TrainConfig(epochs=5, lr=2e-3, weight_decay=0.05)}


def _key(name: str, cfg: TrainConfig) -> str:
    import hashlib

    parts = json.dumps({"name": name, "train": asdict(cfg), "torch": torch.__version__.split("+")[0],
                        "format": 1}, sort_keys=True)
    return hashlib.sha256(parts.encode()).hexdigest()[:16]


def train(name: str, cfg: TrainConfig | None = None, log=print) -> tuple[nn.Module, float]:
    """Train `name` on the Fashion-MNIST train split; (model in eval mode, test accuracy %)."""
    cfg = cfg or TRAINING.get(name, TrainConfig())
    from tqdm.auto import tqdm

    from logart.data.images import fashion_mnist, fashion_tensors
    from logart.eval.classify import logits, top1

    if name not in ARCHS:
        raise LogartError(f"unknown Fashion-MNIST model {name!r}.", f"use one of {', '.join(ARCHS)}.")
    images, labels = fashion_mnist("train")
    x, y = fashion_tensors(images), labels
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed)
    # training needs autograd even when the caller loads the model under torch.no_grad()
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(cfg.seed)
        model = ARCHS[name]()
        steps = cfg.epochs * (len(x) // cfg.batch)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=steps)
        t0 = time.perf_counter()
        model.train()
        with tqdm(total=steps, desc=f"training {name}", unit="step", disable=log is None) as bar:
            for _ in range(cfg.epochs):
                order = torch.randperm(len(x), generator=g)
                for i in range(len(x) // cfg.batch):
                    idx = order[i * cfg.batch:(i + 1) * cfg.batch]
                    loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update()
        model.eval()
    torch.set_num_threads(threads)
    test_images, test_labels = fashion_mnist("test")
    acc = top1(logits(model, fashion_tensors(test_images)), test_labels)
    if log:
        log(f"trained {name} in {time.perf_counter() - t0:.0f} s: test accuracy {acc:.2f} %")
    return model, acc


def fashion_model(name: str, cfg: TrainConfig | None = None, log=print) -> tuple[nn.Module, float]:
    """The trained, cached `name` (see the module doc): (model in eval mode, its fp32 test accuracy %)."""
    cfg = cfg or TRAINING.get(name, TrainConfig())
    from safetensors.torch import load_file, save_file

    from logart.atomic import write_file
    from logart.data.cache import cache_dir

    if name not in ARCHS:
        raise LogartError(f"unknown Fashion-MNIST model {name!r}.", f"use one of {', '.join(ARCHS)}.")
    folder = cache_dir() / "fashion"
    stem = folder / f"{name}-{_key(name, cfg)}"
    weights, meta = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    if weights.is_file() and meta.is_file():
        try:
            model = ARCHS[name]()
            model.load_state_dict(load_file(weights))
            return model.eval(), json.loads(meta.read_text())["accuracy"]
        except Exception:  # a damaged cache entry: train again
            pass
    model, acc = train(name, cfg, log)
    write_file(weights, lambda tmp: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp))
    write_file(meta, lambda tmp: Path(tmp).write_text(json.dumps({"accuracy": acc, "train": asdict(cfg)})))
    return model, acc
