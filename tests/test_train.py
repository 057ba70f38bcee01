"""The training loop on a tiny generated SOP-format dataset with a tiny timm model."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from model.config import LossConfig, TrainConfig
from model.datasets import load_dataset
from model.losses import LOSS_NAMES
from model.package import load_package
from model.train import train
from tests.conftest import TINY_BACKBONE


def _config(loss: str = "triplet", epochs: int = 2, **overrides) -> TrainConfig:
    values = dict(
        backbone=TINY_BACKBONE,
        weights="none",
        embed_dim=16,
        loss=LossConfig(name=loss),
        epochs=epochs,
        classes_per_batch=4,
        images_per_class=4,
        lr=1e-3,
        train_image_size=64,
        val_fraction=0.25,
        decode_threads=2,
        freeze_batchnorm=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_each_loss_trains_and_writes_a_package(tiny_sop, tmp_path, loss):
    dataset = load_dataset("sop", tiny_sop)
    result = train(dataset, _config(loss), tmp_path / loss, progress=False)
    history = result.metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert "val_recall@1" in history[-1]
    assert result.metrics["train_images"] == 30 and result.metrics["val_images"] == 10
    model, config = load_package(result.package_dir)
    assert config.provenance["loss"] == loss
    assert len(config.provenance["training_data_hash"]) == 64
    assert model(torch.rand(1, 3, 64, 64)).shape == (1, 16)


def test_seeded_runs_are_identical(tiny_sop, tmp_path):
    dataset = load_dataset("sop", tiny_sop)
    first = train(dataset, _config(epochs=1), tmp_path / "a", progress=False)
    second = train(dataset, _config(epochs=1), tmp_path / "b", progress=False)
    a = load_file(str(first.package_dir / "model.safetensors"))
    b = load_file(str(second.package_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert first.metrics["history"][0]["loss"] == second.metrics["history"][0]["loss"]


def test_resume_continues_from_the_checkpoint(tiny_sop, tmp_path):
    dataset = load_dataset("sop", tiny_sop)
    straight = train(dataset, _config(epochs=2), tmp_path / "straight", progress=False)
    train(dataset, _config(epochs=1), tmp_path / "resumed", progress=False)
    resumed = train(dataset, _config(epochs=2), tmp_path / "resumed", resume=True, progress=False)
    assert [h["epoch"] for h in resumed.metrics["history"]] == [1, 2]
    # One epoch, stop, resume for the second gives the same weights as two epochs straight.
    a = load_file(str(straight.package_dir / "model.safetensors"))
    b = load_file(str(resumed.package_dir / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_unreadable_images_are_skipped_and_counted(tiny_sop, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(tiny_sop, root)
    (root / "train" / "class_1" / "0.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "class_2" / "1.jpg").unlink()
    result = train(load_dataset("sop", root), _config(epochs=1), tmp_path / "m", progress=False)
    assert result.metrics["skipped_images"] == 2
    assert result.metrics["train_images"] + result.metrics["val_images"] == 38


def test_freeze_stages_keeps_early_weights(tiny_sop, tmp_path):
    config = _config(epochs=1, freeze_stages=1)
    result = train(load_dataset("sop", tiny_sop), config, tmp_path / "m", progress=False)
    trained = load_file(str(result.package_dir / "model.safetensors"))
    torch.manual_seed(config.seed)
    reference = train(
        load_dataset("sop", tiny_sop),
        _config(epochs=0, freeze_stages=1),
        tmp_path / "ref",
        progress=False,
    )
    initial = load_file(str(reference.package_dir / "model.safetensors"))
    assert torch.equal(trained["backbone.conv_stem.weight"], initial["backbone.conv_stem.weight"])
    assert not torch.equal(trained["head.projection.weight"], initial["head.projection.weight"])


def test_unknown_options_are_rejected():
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"epochz": 3})
    assert TrainConfig.from_dict({"loss": "eet"}).loss.name == "eet"


def test_freeze_batchnorm_keeps_running_statistics(tiny_sop, tmp_path):
    dataset = load_dataset("sop", tiny_sop)
    config = _config(epochs=1, freeze_batchnorm=True)
    frozen = load_file(
        str(
            train(dataset, config, tmp_path / "f", progress=False).package_dir / "model.safetensors"
        )
    )
    initial = load_file(
        str(
            train(dataset, _config(epochs=0), tmp_path / "i", progress=False).package_dir
            / "model.safetensors"
        )
    )
    moving = load_file(
        str(
            train(dataset, _config(epochs=1), tmp_path / "m", progress=False).package_dir
            / "model.safetensors"
        )
    )
    stats = [k for k in initial if k.endswith("running_mean")]
    assert stats and all(torch.equal(frozen[k], initial[k]) for k in stats)
    assert not all(torch.equal(moving[k], initial[k]) for k in stats)
    weights = [k for k in initial if k.endswith("bn1.weight")]
    assert not all(torch.equal(frozen[k], initial[k]) for k in weights)  # affine still learns
