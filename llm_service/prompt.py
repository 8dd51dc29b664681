"""Chat messages -> prompt token ids, with the video placeholder where the visual tokens go."""

from __future__ import annotations

from dataclasses import dataclass

VIDEO = None  # a part that marks the place of the video


@dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[str | None, ...]  # text, or VIDEO


class PromptError(ValueError):
    pass


ROLES = ("system", "user", "assistant")


def render(model, messages: list[Message]) -> list[int]:
    """Token ids of the chat, ending with the assistant's turn; one placeholder id per video part."""
    if not messages:
        raise PromptError("messages must not be empty")
    chat = []
    for message in messages:
        if message.role not in ROLES:
            raise PromptError(f"role must be one of {ROLES}, got {message.role!r}")
        content = [{"type": "video"} if part is VIDEO else {"type": "text", "text": part} for part in message.parts]
        chat.append({"role": message.role, "content": content})
    text = model.tokenizer.apply_chat_template(
        chat, chat_template=model.chat_template, tokenize=False, add_generation_prompt=True
    )
    return model.tokenizer(text)["input_ids"]
