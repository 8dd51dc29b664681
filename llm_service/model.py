"""The language half of LLaVA-OneVision: decoder, head and tokenizer, loaded from a local checkpoint.

Reads only the language model's tensors. The chat template comes from the tokenizer, or from the
checkpoint's chat_template.jinja / chat_template.json (where processor checkpoints keep it).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from videollm.checkpoint import (
    LANGUAGE_MODEL,
    LM_HEAD,
    CheckpointError,
    load_config,
    load_into,
    read_tensors,
    resolve_dtype,
)


def _chat_template(model_dir: Path, tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    as_json = model_dir / "chat_template.json"
    if as_json.is_file():
        return json.loads(as_json.read_text())["chat_template"]
    raise CheckpointError(f"{model_dir} has no chat template (tokenizer, chat_template.jinja or chat_template.json)")


class LanguageModel:
    def __init__(self, model_dir: Path, device: str, dtype: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

        self.config = load_config(model_dir)
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype)
        text_config = self.config.text_config
        tensors = read_tensors(
            model_dir, {"language model": LANGUAGE_MODEL, "lm head": LM_HEAD}, optional=frozenset({"lm head"})
        )
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(text_config, dtype=self.dtype).eval()
        load_into(self.model.model, tensors["language model"], "language model")
        if tensors["lm head"]:
            load_into(self.model.lm_head, tensors["lm head"], "lm head")
        elif getattr(text_config, "tie_word_embeddings", False) or getattr(self.config, "tie_word_embeddings", False):
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
        else:
            raise CheckpointError(f"the checkpoint in {model_dir} has no lm_head weights and does not tie them")

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.chat_template = _chat_template(model_dir, self.tokenizer)
        self.video_token_id = getattr(self.config, "video_token_id", None) or self.config.video_token_index
        self.video_token = self.tokenizer.convert_ids_to_tokens(self.video_token_id)
        self.eos_token_ids = self._eos_ids(model_dir, GenerationConfig)
        self.hidden_size = text_config.hidden_size

    def _eos_ids(self, model_dir: Path, generation_config_cls) -> set[int]:
        ids = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if (model_dir / "generation_config.json").is_file():
            eos = generation_config_cls.from_pretrained(model_dir).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return ids

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters())
