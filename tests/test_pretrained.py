"""Pretrained starts (issue 12, item 1): a 3-channel ImageNet-style state dict becomes a 1-channel
model's stem by summing its filters (timm's adapt_input_conv), a classifier for other classes
starts fresh, the load is counted, a file that fits poorly stops the run, and timm's own weights
without a network or cache fail with the way out."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from components.errors import UserError
from components.models import build_model

from .conftest import ROOT


def imagenet_like(name="resnet10t", classes=1000) -> dict:
    torch.manual_seed(0)
    return build_model(name, classes, in_chans=3).state_dict()


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_a_3_channel_stem_becomes_its_channel_sum_and_the_head_starts_fresh(tmp_path, fmt):
    src = imagenet_like()
    if fmt == "torch":  # as training scripts save them: nested and with DDP's prefix
        path = tmp_path / "weights.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in src.items()}, "epoch": 90}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in src.items()}, str(path))
    model = build_model("resnet10t", 5, in_chans=1, pretrained_path=str(path))
    own, report = model.state_dict(), model.load_report
    stem = "conv1.0.weight"  # resnet10t's deep stem starts here (pretrained_cfg first_conv)
    assert own[stem].shape[1] == 1 and torch.allclose(own[stem], src[stem].sum(dim=1, keepdim=True))
    assert torch.equal(own["layer4.0.conv2.weight"], src["layer4.0.conv2.weight"])
    assert own["fc.weight"].shape == (5, 512) and not torch.equal(own["fc.weight"], src["fc.weight"][:5])
    assert (report.adapted, report.new, report.unused, report.backbone_share) == (1, 2, 2, 1.0)
    assert report.loaded == len(own) - 3
    assert "1 adapted (input stem), 2 new" in report.line()


def test_a_head_of_ralflows_starts_fresh_and_is_counted_new(tmp_path):
    torch.save(imagenet_like(classes=5), tmp_path / "w.pt")
    model = build_model("resnet10t", 5, in_chans=1, pretrained_path=str(tmp_path / "w.pt"), head="csra")
    report = model.load_report  # the file's classifier has no place; CSRA's two (weight, bias) pairs are new
    assert (report.adapted, report.new, report.unused, report.backbone_share) == (1, 4, 2, 1.0)
    assert "1 adapted (input stem), 4 new, 2 unused" in report.line()


def test_the_same_classes_load_the_head_too(tmp_path):
    torch.save(imagenet_like(classes=5), tmp_path / "w.pt")
    report = build_model("resnet10t", 5, in_chans=1, pretrained_path=str(tmp_path / "w.pt")).load_report
    assert (report.adapted, report.new, report.unused) == (1, 0, 0)


def test_weights_of_another_architecture_stop_the_run(tmp_path):
    torch.save(imagenet_like("resnet18"), tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"of the backbone: below model.pretrained_min_loaded 90%") as err:
        build_model("resnet10t", 5, pretrained_path=str(tmp_path / "other.pt"))
    assert err.value.field == "model.pretrained_min_loaded"
    report = build_model("resnet10t", 5, pretrained_path=str(tmp_path / "other.pt"), min_loaded=0).load_report
    assert 0 < report.backbone_share < 0.9  # told to start anyway: it does, and says how little loaded
    (tmp_path / "junk.pt").write_bytes(b"not weights")
    with pytest.raises(UserError, match="not a safetensors or torch weights file"):
        build_model("resnet10t", 5, pretrained_path=str(tmp_path / "junk.pt"))


def test_timm_weights_offline_without_a_cache_fail_with_the_way_out(tmp_path):
    code = "from components.models import build_model; build_model('resnet10t', 5, pretrained=True)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "model.pretrained: cannot get timm's pretrained weights for 'resnet10t'" in r.stderr
    assert "huggingface-cli download timm/resnet10t.c3_in1k`" in r.stderr  # the Hub id of timm's default tag
    assert "model.pretrained_path" in r.stderr
