"""Backbone factory, offline weights, embedding head, sampler and model package."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from model.backbone import BackboneError, backbone_data_config, create_backbone
from model.head import EmbeddingHead, GeM
from model.offline_weights import (
    OfflineWeightsError,
    offline_weights_path,
    rename_lite_state_dict,
)
from model.package import ModelConfig, ModelPackageError, build_model, load_package, save_package
from model.samplers import PKSampler
from model.transforms import eval_transform
from tests.conftest import TINY_BACKBONE


def test_offline_lite0_weights_load_strictly_and_classify(grocery_root):
    """Every tensor of the packaged checkpoint lands in timm's model (strict) and the result is
    a working ImageNet classifier: real shop photos get their ImageNet class."""
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=1000)
    state = torch.load(offline_weights_path("tf_efficientnet_lite0"), weights_only=True)
    renamed = rename_lite_state_dict(state, model)
    assert set(renamed) == set(model.state_dict())
    model.load_state_dict(renamed, strict=True)
    transform = eval_transform(backbone_data_config(model))
    expected = {"Apple/Granny-Smith": 948, "Banana": 954}  # ImageNet "Granny Smith", "banana"
    for folder, imagenet_class in expected.items():
        photos = sorted((grocery_root / "train" / "Fruit" / folder).glob("*.jpg"))[:3]
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
        with torch.inference_mode():
            predicted = model.eval()(batch).argmax(-1)
        assert predicted.tolist() == [imagenet_class] * len(photos)


def test_default_backbone_is_offline_lite0_with_its_normalisation():
    backbone = create_backbone()
    config = backbone_data_config(backbone)
    assert backbone.num_features == 1280
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]
    assert config["input_size"] == [3, 224, 224]


def test_unknown_backbone_and_missing_offline_weights_are_clear():
    with pytest.raises(BackboneError, match="unknown timm model"):
        create_backbone("no_such_model_xyz")
    with pytest.raises(OfflineWeightsError, match="no offline ImageNet weights"):
        offline_weights_path("resnet50")


def test_checkpoint_path_weights(tmp_path):
    source = create_backbone(TINY_BACKBONE, "none")
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    loaded = create_backbone(TINY_BACKBONE, tmp_path / "backbone.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(TINY_BACKBONE, tmp_path / "missing.pth")


def test_gem_with_p_one_is_average_pooling():
    x = torch.rand(2, 4, 5, 5)
    gem = GeM(p=1.0)
    assert torch.allclose(gem(x), x.mean(dim=(2, 3)), atol=1e-6)
    assert (GeM(p=6.0)(x) > x.mean(dim=(2, 3))).all()  # larger p leans toward max pooling


@pytest.mark.parametrize(("embed_dim", "pooling"), [(None, "avg"), (32, "gem")])
def test_head_outputs_unit_vectors(embed_dim, pooling):
    head = EmbeddingHead(16, embed_dim, pooling)
    out = head(torch.rand(3, 16, 4, 4))
    assert out.shape == (3, embed_dim or 16)
    assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)


def test_pk_sampler_batches():
    labels = [0] * 5 + [1] * 3 + [2] * 1 + [3] * 6
    sampler = PKSampler(labels, classes_per_batch=2, images_per_class=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(labels) // 8
    for batch in batches:
        classes = [labels[i] for i in batch]
        assert len(batch) == 8 and len(set(classes)) == 2
        assert all(classes.count(c) == 4 for c in set(classes))
        assert 2 not in classes  # a single-image class cannot give a positive pair
    sampler.set_epoch(1)
    assert list(sampler) != batches  # a new epoch draws new batches
    sampler.set_epoch(0)
    assert list(sampler) == batches  # reproducible
    with pytest.raises(ValueError, match="at least 2 classes"):
        PKSampler([0, 0, 1], 2, 2)


def test_package_round_trip_gives_identical_embeddings(tmp_path):
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=24, pooling="gem")
    model = build_model(config).eval()
    save_package(model, config, tmp_path / "pkg", metrics={"recall@1": 0.5})
    loaded, loaded_config = load_package(tmp_path / "pkg")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)
    assert loaded_config.data == config.data and loaded_config.data["input_size"] == [3, 160, 160]
    written = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert written["embed_dim_out"] == 24 and written["backbone"] == TINY_BACKBONE


def test_broken_packages_are_refused(tmp_path):
    with pytest.raises(ModelPackageError, match=r"no config\.json"):
        load_package(tmp_path)
    config = ModelConfig(backbone=TINY_BACKBONE, weights="none", embed_dim=8)
    save_package(build_model(config), config, tmp_path / "pkg")
    (tmp_path / "pkg" / "model.safetensors").write_bytes(np.random.bytes(100))
    with pytest.raises(ModelPackageError, match="unusable"):
        load_package(tmp_path / "pkg")


def test_timm_hub_path_fails_clearly_when_no_hub_is_reachable():
    """`--weights imagenet` for a non-Lite model (ResNet-50, as in the papers) goes to timm's
    hub; offline that is a BackboneError that says what to do instead."""
    code = (
        "from model.backbone import create_backbone, BackboneError\n"
        "try:\n    create_backbone('resnet50')\n"
        "except BackboneError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert "ERR could not download pretrained weights for 'resnet50'" in result.stdout
    assert "tf_efficientnet_lite0" in result.stdout


@pytest.mark.gpu
def test_cuda_amp_training_step():
    """On a GPU: channels-last + bf16 autocast forward/backward gives finite unit embeddings."""
    config = ModelConfig(embed_dim=128)
    model = build_model(config).cuda().to(memory_format=torch.channels_last).train()
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(x)
    out.float().sum().backward()
    assert torch.isfinite(out).all() and out.shape == (8, 128)
