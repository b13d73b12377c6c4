"""Shared benchmark prompts: varied lengths, as real traffic has."""

from __future__ import annotations

_TOPICS = [
    "the history of the printing press", "how a bicycle stays upright", "why the sky is blue",
    "the rules of chess", "photosynthesis", "the French revolution", "how vaccines work",
    "the water cycle", "black holes", "the invention of the telephone", "plate tectonics",
    "how compilers work", "the life of bees", "the Roman empire", "machine learning", "volcanoes",
]
_STYLES = [
    "Explain {t}.",
    "Write a short story for children about {t}.",
    "You are a patient teacher. A student who has never heard of it asks you about {t}. "
    "Give a clear explanation with one example and one common misconception.",
    "Summarise {t} in three bullet points, then give a one-sentence conclusion that a busy reader "
    "could remember, and finally suggest two questions for further study that go deeper than the "
    "usual textbook treatment of the subject.",
]


def benchmark_prompts(count: int) -> list[str]:
    """`count` distinct prompts of 5 to ~60 tokens."""
    return [
        _STYLES[i % len(_STYLES)].format(t=_TOPICS[(i // len(_STYLES)) % len(_TOPICS)]) + ("" if i < 64 else f" ({i})")
        for i in range(count)
    ]
