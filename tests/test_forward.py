"""The forward seam: batches that are mappings of tensors, outputs that are tuples, mappings or objects with
``.logits``. A model fed that way gives the same figures as the same weights fed a plain tensor."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from helpers import SmallCNN, TensorBundle
from ftdoctor import forward
from ftdoctor.diagnose import ProbeOptions, probe_model


@dataclass
class Output:
    """Like a Hugging Face ``ModelOutput``: the logits as an attribute, next to other things."""

    logits: torch.Tensor
    hidden: torch.Tensor


class KeywordNet(nn.Module):
    """SmallCNN's layers, called as ``model(pixels=..., mask=...)`` and returning an :class:`Output`."""

    def __init__(self, net: SmallCNN) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor) -> Output:
        hidden = self.net.features(pixels * mask[:, :, None, None])
        return Output(logits=self.net.fc(hidden), hidden=hidden)


class _Keyed(torch.utils.data.Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {"pixels": self.x[i], "mask": torch.ones(self.x.shape[1])}, int(self.y[i]), i


class KeyedBundle(TensorBundle):
    """The same examples, each one's inputs a mapping ``{"pixels", "mask"}``."""

    @property
    def dataset(self):
        return _Keyed(self.x, self.y)


@pytest.mark.parametrize("out, expected", [
    (torch.ones(2, 3), torch.ones(2, 3)),
    ((torch.ones(2, 3), torch.zeros(1)), torch.ones(2, 3)),
    ({"logits": torch.ones(2, 3), "loss": torch.zeros(())}, torch.ones(2, 3)),
    (Output(torch.ones(2, 3), torch.zeros(2, 8)), torch.ones(2, 3)),
])
def test_the_logits_are_found_in_every_kind_of_output(out, expected):
    assert torch.equal(forward.as_logits(out), expected)


def test_mapping_inputs_are_keyword_arguments_and_batch_key_by_key():
    examples = [{"pixels": torch.full((3, 4, 4), float(i)), "mask": torch.ones(3)} for i in range(3)]
    batch = forward.stack(examples)
    assert batch["pixels"].shape == (3, 3, 4, 4) and batch["mask"].shape == (3, 3)
    assert forward.batch_size(batch) == 3 and forward.head(batch, 2)["pixels"].shape[0] == 2
    empty = forward.empty_batch(examples[0])
    assert empty["pixels"].shape == (0, 3, 4, 4) and empty["mask"].shape == (0, 3)
    net = KeywordNet(SmallCNN(num_classes=5)).eval()
    assert forward.logits(net, batch).shape == (3, 5)


@pytest.mark.parametrize("mode", ["exact", "batch"])
def test_every_figure_is_the_same_through_keywords_and_an_output_object(mode):
    torch.manual_seed(0)
    net = SmallCNN(num_classes=5).eval()
    reference = SmallCNN(num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 3, 8, 8, generator=g), torch.randint(0, 5, (40,), generator=g)
    options = ProbeOptions(change_rate_mode=mode, seed=3)
    plain = probe_model(net, TensorBundle(x, y, 5, batch_size=16), options, reference=reference)
    keyed = probe_model(KeywordNet(net), KeyedBundle(x, y, 5, batch_size=16), options,
                        reference=KeywordNet(reference))
    assert list(keyed.results) == list(plain.results) == ["noise", "change_rate", "grad_norm", "r2", "drift"]
    for name, result in plain.results.items():
        ours, theirs = result.figures.to_json(), keyed.results[name].figures.to_json()
        assert not _differences(_renamed(theirs), ours), (name, _differences(_renamed(theirs), ours))
    assert [l.name for l in keyed.layers] == ["net." + l.name for l in plain.layers]


def _renamed(doc):
    """The keyword model's layers are ``net.<name>``: strip that prefix to compare with the plain model."""
    if isinstance(doc, dict):
        return {k: _renamed(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_renamed(v) for v in doc]
    if isinstance(doc, str) and doc.startswith("net."):
        return doc[4:]
    return doc


def _differences(a, b, path=""):
    """Where two JSON documents differ, numbers compared to 1e-6 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} vs {sorted(b)}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (u, v) in enumerate(zip(a, b)) for d in _differences(u, v, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)):
        return [] if b == pytest.approx(a, rel=1e-6, abs=1e-12) else [f"{path}: {a} vs {b}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]
