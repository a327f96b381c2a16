"""Reasoning formats per model family, as data, and how a question becomes a prompt.

A family says which text opens and closes the reasoning, which text to force after a cut so
the model states its answer, and its raw prompt template.  Strategies read these fields;
they never branch on a family's name.

:func:`build_prompt` uses the model's own chat template (from GGUF metadata or
``tokenizer_config.json``, rendered with Jinja2 as Hugging Face does, with the generation
prompt appended and ``enable_thinking`` set, so reasoning templates open the reasoning block
rather than closing it) when the model has one and the family uses chat, and the family's raw
template otherwise or when ``raw=True``.
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
    chat: bool = True  # use the model's chat template when it has one


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # The shipped tiny model: the prompt opens the reasoning itself.
        Family("tiny", "{question}\n<think>", "<think>", "</think>", "\nThe answer is ", chat=False),
        # DeepSeek-R1 and its distills: the chat template opens <think>.
        Family("deepseek-r1", "{question}", "<think>", "</think>", "\n\n**Final Answer**\n\\boxed{"),
        Family("qwen3", "{question}", "<think>", "</think>", "\n\nThe answer is \\boxed{"),
        # Models without a reasoning block: a cut simply asks for the answer.
        Family("plain", "{question}", "", "", "\nThe answer is "),
    )
}


TINY_NAME = "edgetts-tiny"  # general.name of the shipped GGUF, kept by quantization


def guess_family(model: str, chat_template: str | None, model_name: str | None = None) -> Family:
    """The tiny model's format (by name or GGUF ``general.name``), a ``<think>`` family when the chat
    template mentions it, else plain."""
    if model == "tiny" or model_name == TINY_NAME:
        return FAMILIES["tiny"]
    if chat_template and "<think>" in chat_template:
        return FAMILIES["qwen3"] if "im_start" in chat_template else FAMILIES["deepseek-r1"]
    return FAMILIES["plain"]


class ChatTemplateRefused(ValueError):
    """The chat template would not render these messages (many insist that roles alternate)."""


def render_chat(template: str, question: str | list[dict], bos: str = "", eos: str = "") -> str:
    """A chat template rendered for one user turn (or a whole ``messages`` list), ready for the assistant's reply."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    # Reasoning templates read ``enable_thinking``; left undefined, some (llama.cpp's copy of the
    # DeepSeek-R1-Distill template) close the reasoning block at once and the model never thinks.
    try:
        return env.from_string(template).render(
            messages=[{"role": "user", "content": question}] if isinstance(question, str) else question,
            add_generation_prompt=True, bos_token=bos, eos_token=eos,
            enable_thinking=True,
        )
    except jinja2.TemplateError as e:  # the template's own raise_exception, or what it cannot render
        raise ChatTemplateRefused(f"the model's chat template refuses these messages: {e}") from None


def build_prompt(family: Family, question: str, chat_template: str | None = None, raw: bool = False,
                 messages: list[dict] | None = None) -> str:  # fmt: skip
    """The prompt for ``question``: the model's chat template when it applies, else the raw template.

    With ``messages`` (a chat: system prompt and earlier turns, ending with the user's question),
    the chat template renders them all; the raw template gets the earlier turns as
    ``role: content`` lines before the question.
    """
    if chat_template and family.chat and not raw:
        return render_chat(chat_template, messages or question)
    earlier = "".join(f"{m['role']}: {m['content']}\n" for m in (messages or [])[:-1])
    return earlier + family.prompt_template.format(question=question)
