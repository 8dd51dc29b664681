"""Random-weight LLaVA-OneVision checkpoints at the real shapes (speed does not depend on weights).

The tokenizer is the project's own small one; the LLM keeps the real vocabulary size for the
head's cost, and the head rows of ids the tokenizer lacks are zeroed so that random answers
decode to text. Everything else (layers, widths, heads, 26 SigLIP layers at 384 px) is as in
llava-onevision-qwen2-{0.5b,7b}-ov.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SIGLIP_SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                     image_size=384, patch_size=14, vision_use_head=False)
QWEN2 = {
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SHAPES = ("tiny", *QWEN2)


def add_checkpoint_arguments(parser) -> None:
    """--shape, --device and --checkpoint-dir, as the step benchmarks (bench.*_steps) take them."""
    parser.add_argument("--shape", choices=SHAPES, default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("bench_out/ckpt"))


def build_checkpoint(shape: str, out_dir: Path, device: str = "cpu") -> Path:
    """Write the checkpoint for `shape` to out_dir (kept if it is already there)."""
    from transformers import GenerationConfig, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers import Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from videollm.tiny_model import CHAT_TEMPLATE, IMAGE_TOKEN, VIDEO_TOKEN, build_tiny_model, build_tokenizer

    out = Path(out_dir)
    marker = out / "videollm_model.json"
    if marker.is_file() and json.loads(marker.read_text()).get("shape") == shape:
        return out
    if shape == "tiny":
        build_tiny_model(out)
        marker.write_text(json.dumps({"name": "videollm-tiny-llava-onevision", "shape": "tiny"}))
        return out
    tokenizer = build_tokenizer()
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = Qwen2Config(**QWEN2[shape], max_position_embeddings=32768, rope_theta=1000000.0, eos_token_id=eos)
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**SIGLIP_SO400M), text_config=text,
        video_token_id=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1, vision_feature_select_strategy="full",
        tie_word_embeddings=QWEN2[shape]["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlavaOnevisionForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():
        model.lm_head.weight[len(tokenizer):] = 0  # ids the tokenizer cannot decode never win
    model.generation_config = GenerationConfig(eos_token_id=[eos], pad_token_id=tokenizer.pad_token_id,
                                               do_sample=False)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="5GB")
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    LlavaOnevisionVideoProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(out)
    marker.write_text(json.dumps({"name": f"bench-llava-onevision-{shape}-random", "shape": shape}))
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out
