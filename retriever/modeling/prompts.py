"""Text templates: retrieval prefixes, task instructions and the zero-shot one-word prompt.

The one-word prompt (PromptReps-style zero-shot embeddings from an instruction-tuned LLM) asks
the chat model to summarise the text in one word and begins its answer; the hidden state of the
last prompt token, just before that word would be generated, is the embedding::

    user:      Passage: "<text>". Use one word to represent the passage in a retrieval task.
               Make sure your word is in lowercase.
    assistant: The word is: "
"""

from __future__ import annotations

from dataclasses import dataclass

ONE_WORD_INSTRUCTION = ('{Kind}: "{text}". Use one word to represent the {kind} in a retrieval '
                        'task. Make sure your word is in lowercase.')
ONE_WORD_ANSWER_START = 'The word is: "'
PROMPT_MODES = ("none", "one-word")
_PLACEHOLDER = "\u2063TEXT\u2063"  # an invisible separator that no tokenizer merges across


def with_instruction(prefix: str, instruction: str | None) -> str:
    """E5-Mistral style task instruction ahead of the query prefix."""
    return f"Instruct: {instruction}\n{prefix}" if instruction else prefix


@dataclass(frozen=True)
class Template:
    """A text is embedded as ``before + text + after``; the text alone is truncated."""

    before: str
    after: str

    def render(self, text: str) -> str:
        return f"{self.before}{text}{self.after}"


def one_word_template(tokenizer, kind: str) -> Template:
    """The chat-templated one-word prompt for ``kind`` in {"query", "passage"}."""
    if kind not in ("query", "passage"):
        raise ValueError(f"kind {kind!r}: expected 'query' or 'passage'")
    user = ONE_WORD_INSTRUCTION.format(Kind=kind.capitalize(), kind=kind, text=_PLACEHOLDER)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}],
                                                 tokenize=False, add_generation_prompt=True)
    else:  # a base model: the same words, no chat markup
        rendered = f"{user}\n"
    rendered += ONE_WORD_ANSWER_START
    before, after = rendered.split(_PLACEHOLDER)
    return Template(before, after)
