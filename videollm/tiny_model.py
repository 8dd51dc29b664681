"""The embedded default model: a small LLaVA-OneVision built deterministically, offline.

It uses transformers' own architecture classes and keeps every shape that gives layer indices and
token counts their meaning (384 px frames, 14 px patches, 26 SigLIP layers, 729 patches pooled to
196 tokens per frame, one newline token per video) with small widths, so that every command and
test runs on a laptop CPU. The tokenizer is a real byte-level BPE trained here on a fixed corpus,
with a Qwen-style chat template and the `<video>`/`<image>` placeholders. Its answers are
meaningless text; only real checkpoints give real answers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SEED = 0
VISION_HIDDEN = 64
TEXT_HIDDEN = 128  # visual tokens of 48+ frames exceed 4 MiB, so tests cross gRPC's message limit
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN]

# LLaVA-OneVision-Qwen2's chat template: media placeholders first, then the text parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% endif %}{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# A fixed training corpus: the tokenizer must be identical on every machine.
_CORPUS = """\
A video is a sequence of frames. Each frame is an image of the scene at one moment in time.
The camera pans across the street while a red car drives past a blue house and a dog runs after it.
What happens in this video? Describe the main events in order, and say what the person is holding.
The answer is short: a man opens the door, walks into the kitchen, and pours a cup of coffee.
Questions about videos ask who, what, where, when, why and how many. Count the people in the room.
Beautiful is better than ugly. Explicit is better than implicit. Simple is better than complex.
Complex is better than complicated. Flat is better than nested. Sparse is better than dense.
Readability counts. Special cases aren't special enough to break the rules.
Errors should never pass silently. In the face of ambiguity, refuse the temptation to guess.
There should be one, and preferably only one, obvious way to do it. Now is better than never.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ?
Le renard brun saute par-dessus le chien paresseux. Der schnelle braune Fuchs springt. 视频 问题 答案
"""


def build_tokenizer(vocab_size: int = 1024):
    """Train the byte-level BPE tokenizer of the embedded default (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"video_token": VIDEO_TOKEN, "image_token": IMAGE_TOKEN},
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(vocab_size: int, video_token_id: int, image_token_id: int, eos_token_id: int):
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=26,
        num_attention_heads=4,
        image_size=384,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
    )
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        video_token_id=video_token_id,
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )


def build_tiny_model(out_dir: str | Path) -> Path:
    """Write the embedded default checkpoint (weights, config, tokenizer, processors) to out_dir."""
    from transformers import GenerationConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = tiny_config(
        vocab_size=len(tokenizer),
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        eos_token_id=eos_id,
    )
    torch.manual_seed(SEED)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=[eos_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    LlavaOnevisionVideoProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5]).save_pretrained(out)
    (out / "videollm_model.json").write_text(json.dumps({"name": "videollm-tiny-llava-onevision", "seed": SEED}))
    return out
