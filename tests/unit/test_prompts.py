"""The one prompt (method.md §1): exact text, spans, per-domain wording."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gdrt_core.errors import GdrtError
from gdrt_core.prompts import (
    DOMAINS,
    RESPONSE_HEADER,
    history_prefix,
    instruction_text,
    prompt_template,
    render,
)

OFFICE_TITLES = Path(__file__).resolve().parents[2] / "data" / "office" / "id2name4Rec.json"

HISTORY = ["HP 12C Financial Calculator", "AT&amp;T 210 Corded Phone, White, 1 Handset", 'Binder, 2", Blue']
TARGET = "Texas Instruments TI-83 Graphing Calculator"

EXPECTED_OFFICE_TEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n"
    "\n"
    "### Instruction:\n"
    "Given a list of office products the user has bought before, please recommend a new office product that "
    "the user likes to the user.\n"
    "\n"
    "### Input:\n"
    'The user has bought the following office products before: "HP 12C Financial Calculator", '
    '"AT&amp;T 210 Corded Phone, White, 1 Handset", "Binder, 2", Blue"\n'
    "\n"
    "### Response:\n"
    '"Texas Instruments TI-83 Graphing Calculator"'
)


def test_office_example_exact_text():
    rendered = render("office", HISTORY, TARGET)
    assert rendered.text == EXPECTED_OFFICE_TEXT
    assert rendered.response == '"Texas Instruments TI-83 Graphing Calculator"'
    assert rendered.prompt == EXPECTED_OFFICE_TEXT[: -len(rendered.response)]
    assert rendered.prompt.endswith("\n\n" + RESPONSE_HEADER) and RESPONSE_HEADER == "### Response:\n"


def test_office_example_spans():
    """Spans by hand. The history prefix sentence starts at 157 (system) + 2 ("\n\n") + 17 ("### Instruction:\n")
    + 130 (office instruction) + 2 + 11 ("### Input:\n") = 319 and is 58 characters long, so the opening
    quote is character 377 and title 0 (27 chars) is [378, 405); `", "` (4 chars) puts title 1 (43 chars)
    at [409, 452) and title 2 (16 chars) at [456, 472).
    """
    rendered = render("office", HISTORY, TARGET)
    assert rendered.history_spans == ((378, 405), (409, 452), (456, 472))
    for (start, end), title in zip(rendered.history_spans, HISTORY, strict=True):
        assert rendered.text[start:end] == title
        assert rendered.text[start - 1] == '"' and rendered.text[end] == '"'
    start, end = rendered.response_span
    assert (start, end) == (len(rendered.prompt), len(rendered.text))
    assert rendered.text[start:end] == f'"{TARGET}"'


def test_inference_prompt_is_byte_identical_to_the_training_prompt():
    training = render("office", HISTORY, TARGET)
    inference = render("office", HISTORY)
    assert inference.prompt == training.prompt and inference.prompt.encode() == training.prompt.encode()
    assert inference.response == "" and inference.text == inference.prompt
    assert inference.history_spans == training.history_spans
    assert inference.response_span == (len(inference.prompt), len(inference.prompt))
    assert render("office", tuple(HISTORY), TARGET) == training  # a tuple renders the same


def test_empty_history_exact_text():
    """The grouping stage's `drop` mode: the prefix sentence is kept, followed directly by the blank line."""
    rendered = render("office", [], "Pen")
    assert rendered.history_spans == ()
    assert rendered.text.endswith(
        "### Input:\nThe user has bought the following office products before: \n\n### Response:\n\"Pen\""
    )


EXPECTED_WORDING = {
    "office": (
        "Given a list of office products the user has bought before, please recommend a new office product "
        "that the user likes to the user.",
        "The user has bought the following office products before: ",
    ),
    "toys": (
        "Given a list of toys the user has bought before, please recommend a new toy that the user likes to "
        "the user.",
        "The user has bought the following toys before: ",
    ),
    "books": (
        "Given a list of books the user has bought before, please recommend a new book that the user likes to "
        "the user.",
        "The user has bought the following books before: ",
    ),
    "clothing": (
        "Given a list of clothing items the user has bought before, please recommend a new clothing item that "
        "the user likes to the user.",
        "The user has bought the following clothing items before: ",
    ),
    "games": (
        "Given a list of video games the user has played before, please recommend a new video game that the "
        "user likes to the user.",
        "The user has played the following video games before: ",
    ),
    "cds": (
        "Given a list of CDs the user has listened to before, please recommend a new CD that the user likes "
        "to the user.",
        "The user has listened to the following CDs before: ",
    ),
    "generic": (
        "Given a list of items the user has bought before, please recommend a new item that the user likes to "
        "the user.",
        "The user has bought the following items before: ",
    ),
}


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_domain_wording(domain):
    instruction, prefix = EXPECTED_WORDING[domain]
    assert instruction_text(domain) == instruction
    assert history_prefix(domain) == prefix
    text = render(domain, ["A", "B"], "C").text
    assert f"### Instruction:\n{instruction}\n\n### Input:\n{prefix}\"A\", \"B\"\n\n### Response:\n\"C\"" in text


def test_every_domain_has_expected_wording():
    assert set(EXPECTED_WORDING) == set(DOMAINS)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_template_matches_render(domain):
    """The template stored in the dataset manifest fills to the rendered text (EOS as `<eos>`)."""
    history = ['Pen, "blue"', "Ink {refill}"]
    filled = prompt_template(domain).replace("{history}", '"Pen, "blue"", "Ink {refill}"').replace("{target}", "Pad")
    assert filled == render(domain, history, "Pad").text + "<eos>"


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(GdrtError, match=r"unknown domain 'garden'.*use one of office, toys"):
        render("garden", ["a"], "b")


def test_spans_select_titles_on_real_windows():
    """Real Office titles (entities, quotes, commas, a newline, 427-char titles): every span is its title."""
    titles = list(json.loads(OFFICE_TITLES.read_text(encoding="utf-8")).values())
    rng = random.Random(0)
    for _ in range(200):
        window = rng.sample(titles, rng.randint(1, 11))
        rendered = render("office", window[:-1], window[-1])
        assert [rendered.text[s:e] for s, e in rendered.history_spans] == window[:-1]
        assert rendered.text[slice(*rendered.response_span)] == f'"{window[-1]}"'
        assert rendered.prompt.endswith(RESPONSE_HEADER)
