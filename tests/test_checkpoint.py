"""Checkpoints saved in either key layout load into the same encoder and LLM halves."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from encoder_service.vision import VisionEncoder
from llm_service.model import LanguageModel
from videollm.checkpoint import CheckpointError, check_model_dir
from videollm.settings import CompressionSettings

HUB = [("vision_tower.", "vision_tower.vision_model."), ("language_model.model.", "language_model.model."),
       ("language_model.lm_head.", "language_model.lm_head."), ("multi_modal_projector.", "multi_modal_projector."),
       ("image_newline", "image_newline")]
TRANSFORMERS_5 = [("vision_tower.", "model.vision_tower."), ("language_model.model.", "model.language_model."),
                  ("language_model.lm_head.", "lm_head."), ("multi_modal_projector.", "model.multi_modal_projector."),
                  ("image_newline", "model.image_newline")]


def rename(tensors: dict, mapping) -> dict:
    out = {}
    for key, value in tensors.items():
        for old, new in mapping:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            out[key] = value
    return out


def relayout(source, target, mapping):
    shutil.copytree(source, target)
    for file in target.glob("*.safetensors"):
        save_file(rename(load_file(file), mapping), file, metadata={"format": "pt"})
    return target


@pytest.mark.parametrize("layout", [HUB, TRANSFORMERS_5], ids=["hub", "transformers-5"])
def test_both_key_layouts_load_the_same_weights(tiny_model_dir, tmp_path, layout):
    other = relayout(tiny_model_dir, tmp_path / "model", layout)
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(0))
    none = CompressionSettings(method="none")
    expected = VisionEncoder(tiny_model_dir, "cpu", "float32").encode(pixels, none).tokens
    assert torch.equal(VisionEncoder(other, "cpu", "float32").encode(pixels, none).tokens, expected)
    reference, loaded = LanguageModel(tiny_model_dir, "cpu", "float32"), LanguageModel(other, "cpu", "float32")
    for a, b in zip(reference.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_directory_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        check_model_dir(tmp_path)
