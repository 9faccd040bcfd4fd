"""A conversation on one context: the history a follow-up question is appended to (`LSAEngine.ask`).

After an answer, the history is the document, every question and every answer but its last
token, whose KV is computed together with the next question (a decoded token is fed to the
model only at the next step). An eviction policy's decision (`policies.base.Eviction`) goes on
with the conversation, so no later question can see what it dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import LSAConfig
from ..memory.pools import HostMirror
from ..policies import SelectionPolicy
from ..policies.base import Eviction

if TYPE_CHECKING:
    from .engine import LSAEngine


@dataclass
class Conversation:
    """What `LSAEngine.ask` needs to append the next question after the last answer."""

    host: HostMirror                  # KV of `ids` (the whole history, evicted pages included: they are never read)
    ids: list[int]                    # the history's token ids
    last_token: int | None            # the last answer token (None when it was an end-of-sequence token)
    window: tuple[torch.Tensor, torch.Tensor] | None  # hybrid models: the sliding layers' rings after `ids`
    policy: SelectionPolicy
    config: LSAConfig
    chat: bool
    eviction: Eviction | None         # an eviction policy's decision, kept for every later question
    max_new_tokens: int               # the last answer's limit (the next one's default)
    dense_device_peak: int
    turns: int                        # questions answered so far


def _turn_parts(engine: "LSAEngine") -> tuple[str, str]:
    """The chat template's text between an assistant's answer and the next user message, and after it."""
    from .engine import PromptError

    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; ask without chat")
    marks = ["\x00FLASHMEMORY-Q1\x00", "\x00FLASHMEMORY-A1\x00", "\x00FLASHMEMORY-Q2\x00"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": marks[0]},
                                          {"role": "assistant", "content": marks[1]},
                                          {"role": "user", "content": marks[2]}],
                                         add_generation_prompt=True, tokenize=False)
    if any(text.count(m) != 1 for m in marks):
        raise PromptError("the model's chat template does not place each message once; ask without chat")
    between, after = text.split(marks[1])[1].split(marks[2])
    return between, after


def follow_up_ids(engine: "LSAEngine", conversation: Conversation, question: str | list[int]) -> list[int]:
    """Token ids appended after the last answer: its last token (unless end-of-sequence), then "\\n\\n" and the
    question, or with `chat` the end of the assistant's turn, a user turn with the question and the opening
    of the next assistant turn. Token ids are appended as they are."""
    from .engine import PromptError

    last = [conversation.last_token] if conversation.last_token is not None else []
    if not isinstance(question, str):  # token ids, appended as they are
        ids = engine._prompt_ids(question, chat=False)
        if not ids:
            raise PromptError("the question is empty")
        return last + ids
    if not question.strip():
        raise PromptError("the question is empty")
    if engine.tokenizer is None:
        raise PromptError("this engine has no tokenizer: pass LSAEngine(model, tokenizer=...)")
    if conversation.chat:
        between, after = _turn_parts(engine)
        text = between + question.strip() + after
    else:
        text = "\n\n" + question.strip()
    return last + engine.tokenizer(text, add_special_tokens=False)["input_ids"]


__all__ = ["Conversation", "follow_up_ids"]
