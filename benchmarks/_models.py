"""The models every benchmark measures, built once here: the contract's SmallCNN, a VGG-style net,
torchvision's resnet18, a tiny ConvNeXt, a small timm ViT and two small Hugging Face BERTs.

Each ``make(n)`` gives ``(name, model in eval mode, inputs, labels, classes, call)`` for ``n`` examples:
``inputs`` is an image tensor or a dict of token ids and mask, ``call(model, inputs)`` the logits. No
weights are downloaded: every model is built from its config with random weights (seeded).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The contract's SmallCNN: plain conv net, no BatchNorm."""

    def __init__(self, num_classes: int = 10, in_ch: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.fc = nn.Linear(32 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class VGGish(nn.Module):
    """VGG-style: six 3×3 convs with ReLU and max-pooling, no BatchNorm, two Linear layers.

    ReLUs are not in-place: BackPACK's hooks refuse an in-place op on a module's output; ftdoctor and
    the training step do not mind either way.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        chans = [3, 32, 32, 64, 64, 128, 128]
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU()]
            if i % 2 == 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(128 * 4 * 4, 256), nn.ReLU(), nn.Linear(256, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18() -> nn.Module:
    from torchvision.models import resnet18 as tv_resnet18
    return tv_resnet18(num_classes=10)


def tiny_convnext() -> nn.Module:
    """torchvision's ConvNeXt with two small stages: 7×7 depthwise conv, then channels-last
    LayerNorm → Linear → GELU → Linear on (N, H, W, C), layer scale, residual."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    return ConvNeXt([CNBlockConfig(32, 64, 1), CNBlockConfig(64, None, 1)], num_classes=10)


def images(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


def cnn(build: Callable[[], nn.Module], name: str) -> Callable[[int], tuple]:
    """``make(n)`` for an image classifier built by ``build()``, on ``n`` random 32×32 images."""
    def make(n: int) -> tuple:
        torch.manual_seed(0)
        x, y = images(n)
        return name, build().eval(), x, y, 10, lambda m, b: m(b)
    make.__name__ = build.__name__
    return make


def _vit(n: int, patch: int) -> tuple:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=patch,
                              depth=4)
    x, y = images(n)
    tokens = (32 // patch) ** 2 + 1
    return (f"timm ViT-tiny (4 blocks, 32px, patch {patch}: {tokens} tokens)", model.eval(), x, y, 10,
            lambda m, b: m(b))


def vit(n: int) -> tuple:
    """timm's ViT-tiny, 4 blocks, on 32×32 images in 8×8 patches: 17 tokens an example."""
    return _vit(n, 8)


def vit65(n: int) -> tuple:
    """The same in 4×4 patches, as CIFAR ViTs are usually cut: 65 tokens an example."""
    return _vit(n, 4)


def _bert(n: int, name: str, length: int, **config: int) -> tuple:
    import transformers
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=4000, num_labels=4, max_position_embeddings=max(64, length),
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **config)
    model = transformers.BertForSequenceClassification(config).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 4000, (n, length), generator=g)
    lengths = torch.randint(length // 4, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return (name, model, {"input_ids": ids * mask, "attention_mask": mask},
            torch.randint(0, 4, (n,), generator=g), 4, lambda m, b: m(**b).logits)


def bert(n: int) -> tuple:
    """A Hugging Face BERT of 2 layers, hidden size 128, on 32 tokens (8 to 32 of them real)."""
    return _bert(n, "HF BERT-mini (2 layers, 32 tokens)", 32, hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=256)


def bert4(n: int) -> tuple:
    """The size of Google's BERT-mini checkpoint (4 layers, hidden size 256) on 128 tokens (32 to 128 real):
    a text fine-tune as it is run, where :func:`bert` is the smallest that still has every part."""
    return _bert(n, "HF BERT 4×256 (4 layers, 128 tokens)", 128, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=1024)
