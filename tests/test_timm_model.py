"""``{name: timm, arch: ...}`` models. timm imports torchvision, which does not import beside this
machine's torch, so the wiring is tested against a stand-in module with timm's two calls
(``list_models``, ``create_model``); the last test runs the real timm wherever it imports."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from distillery import models
from distillery.errors import DistilleryError
from distillery.pipeline import save_weights


class Net(nn.Module):
    def __init__(self, num_classes: int, in_chans: int, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, width, 3, padding=1)
        self.fc = nn.Linear(width, num_classes)
        self.default_cfg = {"classifier": "fc"}

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


@pytest.fixture
def fake_timm(monkeypatch):
    calls = []
    mod = types.ModuleType("timm")
    mod.list_models = lambda: ["tiny_net", "resnet18"]

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        calls.append((name, pretrained, num_classes, in_chans, kw))
        return Net(num_classes, in_chans, **kw)

    mod.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", mod)
    return calls


def test_a_timm_model_by_name_random_init(fake_timm):
    m = models.build("timm", (1, 8, 8), 10, {"arch": "tiny_net", "args": {"width": 6}})
    assert fake_timm == [("tiny_net", False, 10, 1, {"width": 6})]  # never pretrained: nothing is downloaded
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_a_local_checkpoint_verified_and_a_new_head(fake_timm, tmp_path):
    torch.manual_seed(0)
    src = Net(1000, 1)
    save_weights(src, tmp_path / "w.safetensors", {"model": "tiny_net"})
    same = models.build("timm", (1, 8, 8), 1000, {"arch": "tiny_net", "checkpoint": str(tmp_path / "w.safetensors")})
    assert torch.equal(same.conv.weight, src.conv.weight) and torch.equal(same.fc.weight, src.fc.weight)
    with pytest.raises(DistilleryError, match="head: new"):  # 1000 classes into 10
        models.build("timm", (1, 8, 8), 10, {"arch": "tiny_net", "checkpoint": str(tmp_path / "w.safetensors")})
    new = models.build("timm", (1, 8, 8), 10, {"arch": "tiny_net", "checkpoint": str(tmp_path / "w.safetensors"),
                                                "head": "new"})
    assert torch.equal(new.conv.weight, src.conv.weight) and new.fc.out_features == 10
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DistilleryError, match="checksum record"):  # from elsewhere: verify: false, knowingly
        models.build("timm", (1, 8, 8), 1000, {"arch": "tiny_net", "checkpoint": str(tmp_path / "plain.safetensors")})
    models.build("timm", (1, 8, 8), 1000, {"arch": "tiny_net", "checkpoint": str(tmp_path / "plain.safetensors"),
                                           "verify": False})


def test_bad_timm_specs_are_one_line(fake_timm, monkeypatch):
    with pytest.raises(DistilleryError, match="did you mean 'resnet18'"):
        models.build("timm", (3, 8, 8), 10, {"arch": "resnet181"})
    with pytest.raises(DistilleryError, match="give arch"):
        models.build("timm", (3, 8, 8), 10, {})
    monkeypatch.setitem(sys.modules, "timm", None)  # not importable
    with pytest.raises(DistilleryError, match="timm does not import"):
        models.build("timm", (3, 8, 8), 10, {"arch": "resnet18"})


def test_the_real_timm_where_it_imports():
    timm = pytest.importorskip("timm", reason="timm (and a torchvision for this torch) not installed")
    m = models.build("timm", (3, 16, 16), 7, {"arch": "resnet18"})
    assert isinstance(m, timm.models.ResNet) and m(torch.randn(1, 3, 16, 16)).shape == (1, 7)
