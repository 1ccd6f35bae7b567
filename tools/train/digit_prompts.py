"""The prompt templates ``digits-sd`` is trained on, and the prompts the quality metrics and the demo ask it for.

Pure Python (the quality metrics run on the runtime alone). Every template names one digit, as a numeral or a word;
the empty prompt is the unconditional text of classifier-free guidance.
"""

from __future__ import annotations

from typing import Sequence

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TEMPLATES = (
    "a handwritten {numeral}",
    "the digit {word}",
    "number {numeral}",
    "a sketch of {article} {word}",
    "the number {word}",
    "a drawing of the digit {numeral}",
    "handwritten {word}",
    "digit {numeral}",
    "{article} {word}",
    "{numeral}",
)
UNCONDITIONAL = ""


def digit_prompt(digit: int, template: int) -> str:
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    word = DIGIT_WORDS[digit]
    return TEMPLATES[template % len(TEMPLATES)].format(numeral=digit, word=word,
                                                      article="an" if word[0] in "aeiou" else "a")


def all_prompts() -> list[list[str]]:
    """[digit][template] -> prompt: the training corpus."""
    return [[digit_prompt(d, t) for t in range(len(TEMPLATES))] for d in range(10)]


def prompts_for(labels: Sequence[int], first_sample: int = 0) -> list[str]:
    """One prompt per requested digit, the templates cycling with the sample index (sample i of an ``arange % 10``
    label list gets template ``i // 10``), so every template is measured."""
    return [digit_prompt(int(d), (first_sample + i) // 10) for i, d in enumerate(labels)]
