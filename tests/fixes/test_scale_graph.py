"""Where a rescale can be undone (Krähenbühl §3.2): the graph plan, its exactness, and its refusals."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from fixhelp import NETS, brute_force_rates, rel_change
from ftdoctor.errors import FtdoctorError
from ftdoctor.fixes.rescale import apply_scales
from ftdoctor.fixes.scale_graph import plan_rescale
from ftdoctor.model import find_head, forward_order

ns: dict = {}
exec(NETS, ns)
PlainCNN, BNNet = ns["PlainCNN"], ns["BNNet"]


def plan_for(model, x):
    layers = forward_order(model.eval(), x)
    return plan_rescale(model, layers, find_head(layers)), layers


def random_scales(plan, seed=0, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    return {n: float(torch.randn(1, generator=g)) * spread for n in plan.sinks}


def test_plain_chain_every_layer_but_the_head_is_undone_in_the_next():
    torch.manual_seed(0)
    model = PlainCNN()
    plan, layers = plan_for(model, torch.randn(2, 3, 16, 16))
    names = [l.name for l in layers]
    assert set(plan.sinks) == set(names[:-1])
    assert plan.blocked == {names[-1]: "the head: its scale is the model's output"}
    for a, b in zip(names[:-1], names[1:]):          # each undo lands in the next affine layer
        assert plan.sinks[a].kind == "affine" and plan.sinks[a].target == b
    assert plan.sinks["features.2"].via == ("features.3", "features.4")   # ReLU, MaxPool
    assert plan.producer["classifier.0"] == "features.12"


def test_scales_preserve_the_function_and_change_rates_exactly_as_predicted():
    """SPEC §2: rate_k × (r_p / r_k)², checked against a brute-force loop over examples."""
    torch.manual_seed(0)
    model = PlainCNN().eval()
    x = torch.randn(8, 3, 16, 16)
    plan, layers = plan_for(model, x[:2])
    names = [l.name for l in layers]
    before = brute_force_rates(model, x, names)
    ref = copy.deepcopy(model)
    xs = random_scales(plan)
    apply_scales(model, plan, xs)
    after = brute_force_rates(model, x, names)
    with torch.no_grad():
        assert rel_change(ref(x), model(x)) < 1e-5
    for n in names:
        p = plan.producer.get(n)
        want = before[n] * math.exp(2 * (xs.get(p, 0.0) if p else 0.0) - 2 * xs.get(n, 0.0))
        assert math.isclose(after[n], want, rel_tol=1e-4), (n, after[n], want)


def test_batchnorm_absorbs_the_scale_exactly_in_eval():
    torch.manual_seed(0)
    model = BNNet()
    x = torch.randn(16, 3, 8, 8)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x * 3 + 1)
    model.eval()
    # a tiny variance makes ε matter: the weight correction must handle it
    model.features[1].running_var[0] = 1e-6
    plan, layers = plan_for(model, x[:2])
    assert plan.sinks["features.0"].kind == "batchnorm" and plan.sinks["features.0"].target == "features.1"
    assert plan.sinks["features.4"].target == "features.5"
    ref = copy.deepcopy(model)
    apply_scales(model, plan, {"features.0": math.log(50.0), "features.4": math.log(0.02)})
    assert torch.allclose(model.features[1].running_var, ref.features[1].running_var * 2500.0)
    assert torch.allclose(model.features[1].running_mean, ref.features[1].running_mean * 50.0)
    with torch.no_grad():
        assert rel_change(ref(x), model(x)) < 1e-5


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.GELU()
        self.twice = nn.Conv2d(4, 4, 1)
        self.a = nn.Conv2d(4, 4, 1)
        self.b = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        s = self.stem(x)
        h = torch.relu(self.body(s)) + s           # stem feeds two consumers; body feeds a sum
        h = self.twice(self.twice(self.act(h)))     # module called twice; GELU is not homogeneous
        u = torch.cat([self.a(h), self.b(h)], 1)    # concatenation
        return self.fc(u.mean((2, 3)))


def test_layers_that_cannot_be_rescaled_say_why():
    model = Residual()
    plan, _ = plan_for(model, torch.randn(2, 3, 6, 6))
    assert not plan.sinks
    why = plan.blocked
    assert "2 consumers" in why["stem"]
    assert "sum" in why["body"]
    assert "called 2 times" in why["twice"]
    assert "concatenation" in why["a"] and "concatenation" in why["b"]
    assert "head" in why["fc"]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:                            # control flow on a tensor value
            h = h * 2
        return self.fc(h.mean((2, 3)))


def test_an_untraceable_model_is_an_exit_2_error():
    model = Untraceable()
    layers = forward_order(model, torch.randn(1, 3, 5, 5))
    with pytest.raises(FtdoctorError) as info:
        plan_rescale(model, layers, find_head(layers))
    assert info.value.exit_code == 2
    assert "torch.fx" in info.value.cause and "entame" in info.value.remedy


def test_resnet18_all_convs_undo_into_batchnorm_and_keep_the_logits():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32)
    plan, layers = plan_for(model, x)
    convs = [l.name for l in layers if l.kind == "Conv2d"]
    assert set(plan.sinks) == set(convs)
    assert all(s.kind == "batchnorm" for s in plan.sinks.values())
    assert plan.blocked == {"fc": "the head: its scale is the model's output"}
    ref = copy.deepcopy(model)
    apply_scales(model, plan, random_scales(plan, spread=2.0))
    with torch.no_grad():
        assert rel_change(ref(x), model(x)) < 1e-4
