"""The prompt: one function renders it for training, grouping, attribution and inference.

Alpaca-style template (method.md §1). The rendered text ends with the response header
"### Response:\n"; the response is the quoted target title, and the tokenizer's EOS token follows it
(EOS is a token, not text). `render` also returns the character spans of every history title and of the
response, which the tokenisation code maps onto tokens (token roles, method.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "### Response:\n"


@dataclass(frozen=True)
class Domain:
    plural: str  # "office products"
    singular: str  # "office product"
    verb: str = "bought"  # the user has <verb> ... before


DOMAINS: dict[str, Domain] = {
    "office": Domain("office products", "office product"),
    "toys": Domain("toys", "toy"),
    "books": Domain("books", "book"),
    "clothing": Domain("clothing items", "clothing item"),
    "games": Domain("video games", "video game", "played"),
    "cds": Domain("CDs", "CD", "listened to"),
    "generic": Domain("items", "item"),
}


def get_domain(name: str) -> Domain:
    from gdrt_core.errors import GdrtError

    try:
        return DOMAINS[name]
    except KeyError:
        raise GdrtError(f"unknown domain {name!r}", hint=f"use one of {', '.join(DOMAINS)}") from None


def instruction_text(domain: str) -> str:
    d = get_domain(domain)
    return f"Given a list of {d.plural} the user has {d.verb} before, please recommend a new {d.singular} that the user likes to the user."


def history_prefix(domain: str) -> str:
    d = get_domain(domain)
    return f"The user has {d.verb} the following {d.plural} before: "


def prompt_template(domain: str) -> str:
    """The template with {history} and {target} placeholders (stored in the dataset manifest)."""
    return (
        f"{SYSTEM}\n\n### Instruction:\n{instruction_text(domain)}\n\n### Input:\n"
        f"{history_prefix(domain)}{{history}}\n\n{RESPONSE_HEADER}\"{{target}}\"<eos>"
    )


def quote(title: str) -> str:
    return f'"{title}"'


@dataclass(frozen=True)
class Rendered:
    """A rendered example: `prompt` ends with the response header; `response` is the quoted target title.

    history_spans[i] = (start, end) of history title i (0 = oldest) inside `prompt`, quotes excluded.
    response_span = (start, end) of the response inside `prompt + response`.
    """

    prompt: str
    response: str
    history_spans: tuple[tuple[int, int], ...]

    @property
    def text(self) -> str:
        return self.prompt + self.response

    @property
    def response_span(self) -> tuple[int, int]:
        return (len(self.prompt), len(self.prompt) + len(self.response))


def render(domain: str, history: list[str], target: str | None = None) -> Rendered:
    """Render one example. `history` = titles, oldest first (may be empty); `target` None at inference."""
    head = f"{SYSTEM}\n\n### Instruction:\n{instruction_text(domain)}\n\n### Input:\n{history_prefix(domain)}"
    parts = [head]
    pos = len(head)
    spans = []
    for i, title in enumerate(history):
        if i:
            parts.append(", ")
            pos += 2
        parts.append('"')
        pos += 1
        spans.append((pos, pos + len(title)))
        parts.append(title)
        pos += len(title)
        parts.append('"')
        pos += 1
    parts.append(f"\n\n{RESPONSE_HEADER}")
    prompt = "".join(parts)
    response = quote(target) if target is not None else ""
    return Rendered(prompt=prompt, response=response, history_spans=tuple(spans))
