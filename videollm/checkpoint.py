"""Loading one half of a LLaVA-OneVision checkpoint from a local directory.

The encoder service needs the vision tower, projector and newline embedding; the LLM service needs
the language model, its head and the tokenizer. Each reads only its own tensors from the
safetensors files, so neither materialises the other half. Checkpoints saved by any transformers
version are accepted: the hub layout (`language_model.model.*`, `vision_tower.vision_model.*`) and
the transformers 5 layout (`model.language_model.*`, `model.vision_tower.*`) name the same tensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from videollm.tensors import DTYPES


class CheckpointError(RuntimeError):
    pass


@dataclass(frozen=True)
class Part:
    """One component of the checkpoint: which stored prefixes belong to it."""

    prefixes: tuple[str, ...]  # stored prefixes, tried in order; the match is stripped

    def local_name(self, key: str) -> str | None:
        for prefix in self.prefixes:
            if key == prefix.rstrip(".") or key.startswith(prefix):
                return key[len(prefix) :].replace("vision_model.", "")
        return None


VISION_TOWER = Part(("model.vision_tower.", "vision_tower."))
PROJECTOR = Part(("model.multi_modal_projector.", "multi_modal_projector."))
NEWLINE = Part(("model.image_newline", "image_newline"))
LANGUAGE_MODEL = Part(("model.language_model.", "language_model.model."))
LM_HEAD = Part(("lm_head.", "language_model.lm_head."))


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"no LLaVA-OneVision checkpoint at {path}: config.json is missing "
            "(pass a local directory in transformers' format, or run `videollm build-tiny-model DIR`)"
        )
    if not list(path.glob("*.safetensors")):
        raise CheckpointError(f"no *.safetensors weights in {path}")
    return path


def load_config(model_dir: Path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "llava_onevision":
        raise CheckpointError(f"{model_dir} holds a {config.model_type!r} model, expected 'llava_onevision'")
    return config


def model_identity(model_dir: Path) -> str:
    """A short id that changes when the weights or config change (part of every cache key)."""
    digest = hashlib.sha256()
    for f in sorted(model_dir.glob("*.json")) + sorted(model_dir.glob("*.safetensors")):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}".encode())
        if f.suffix == ".json":
            digest.update(f.read_bytes())
        else:  # the safetensors header holds every tensor's name, shape and offsets
            with open(f, "rb") as fh:
                digest.update(fh.read(min(stat.st_size, 1 << 20)))
    name = model_dir.name
    meta = model_dir / "videollm_model.json"
    if meta.is_file():
        name = json.loads(meta.read_text()).get("name", name)
    return f"{name}@{digest.hexdigest()[:16]}"


def read_tensors(
    model_dir: Path, parts: dict[str, Part], optional: frozenset[str] = frozenset()
) -> dict[str, dict[str, torch.Tensor]]:
    """Read only the tensors of the named parts: {part name: {local key: tensor}}."""
    found: dict[str, dict[str, torch.Tensor]] = {name: {} for name in parts}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                for name, part in parts.items():
                    local = part.local_name(key)
                    if local is not None:
                        found[name][local] = handle.get_tensor(key)
                        break
    for name, tensors in found.items():
        if not tensors and name not in optional:
            raise CheckpointError(f"the checkpoint in {model_dir} has no weights for the {name}")
    return found


def load_into(module: torch.nn.Module, tensors: dict[str, torch.Tensor], what: str) -> None:
    """Copy tensors into module by name; every parameter must be present."""
    own = {k.replace("vision_model.", ""): k for k in module.state_dict()}
    missing = sorted(set(own) - set(tensors))
    if missing:
        raise CheckpointError(f"the {what} weights lack {missing[:5]} ({len(missing)} in all)")
    module.load_state_dict({own[k]: tensors[k] for k in own}, strict=True)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory the caching allocator handed out on device (0 off CUDA)."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
