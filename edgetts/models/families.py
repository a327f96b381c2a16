"""Reasoning formats per model family, as data.

A family says how a question becomes a prompt, which text opens and closes the reasoning,
and which text to force after a cut so the model states its answer.  Strategies read these
fields; they never branch on a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    prompt_template: str  # raw-prompt mode; "{question}" is replaced
    think_start: str
    think_end: str
    answer_prefix: str


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The shipped tiny model: the prompt opens the reasoning itself.
        Family("tiny", "{question}\n<think>", "<think>", "</think>", "\nThe answer is "),
        # DeepSeek-R1 and its distills: the chat template opens <think>.
        Family("deepseek-r1", "{question}", "<think>", "</think>", "\n\n**Final Answer**\n\\boxed{"),
        Family("qwen3", "{question}", "<think>", "</think>", "\n\nThe answer is \\boxed{"),
        # Models without a reasoning block: a cut simply asks for the answer.
        Family("plain", "{question}", "", "", "\nThe answer is "),
    )
}


def guess_family(model: str, chat_template: str | None) -> Family:
    """The built-in tiny model's format, a ``<think>`` family when the template mentions it, else plain."""
    if model == "tiny":
        return FAMILIES["tiny"]
    if chat_template and "<think>" in chat_template:
        return FAMILIES["qwen3"] if "im_start" in chat_template else FAMILIES["deepseek-r1"]
    return FAMILIES["plain"]
