"""loraplex.engine.detokenizer: incremental text, stop-string search, text held back while running.

Byte-level BPE splits emoji and CJK characters over several tokens, so a token decoded alone is
often half a character (U+FFFD). Text built one token at a time must still equal the tokenizer's
decode of all the tokens at once, and must never show a half character on the way.
"""

from __future__ import annotations

import pytest

from loraplex import SamplingParams
from loraplex.engine.detokenizer import IncrementalDetokenizer, find_stop_string, visible_text
from loraplex.engine.sequence import Sequence
from tiny_models import embedded  # noqa: F401

TEXTS = [
    "Thumbs up 👍🏽 and a family 👨‍👩‍👧!",
    "你好，世界。東京は日本の首都です。",
    "Crème brûlée à la café, naïve façade, Ærøskøbing.",
    "Привет, мир! مرحبا بالعالم",
    "emoji🎉🎉 tight😀x\n\tnew line and   spaces",
    " leading space, then ½ ≠ ∞ and € 5",
]


@pytest.fixture(scope="module")
def tokenizer(embedded_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_model_path))


def make_seq(prompt_ids: list[int], **params) -> Sequence:
    return Sequence(0, "r", 0, list(prompt_ids), SamplingParams(**params), 0.0)


def stream(tokenizer, prompt_ids: list[int], output_ids: list[int], **params) -> tuple[Sequence, list[str]]:
    """Feed `output_ids` one at a time, as the engine does; flush at the end (finish by length)."""
    detok = IncrementalDetokenizer(tokenizer)
    seq = make_seq(prompt_ids, **params)
    detok.start(seq)
    deltas = []
    for i, token in enumerate(output_ids):
        seq.output_token_ids.append(token)
        deltas.append(detok.append(seq, flush=i == len(output_ids) - 1))
    return seq, deltas


@pytest.mark.parametrize("text", TEXTS, ids=["emoji", "cjk", "accents", "cyrillic-arabic", "mixed", "symbols"])
@pytest.mark.parametrize("prompt", ["", "Translate: ", "日本"], ids=["no-prompt", "ascii-prompt", "cjk-prompt"])
def test_incremental_text_equals_decoding_the_whole(tokenizer, text: str, prompt: str) -> None:
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.encode("x")[0]]
    output_ids = tokenizer.encode(text)
    seq, deltas = stream(tokenizer, prompt_ids, output_ids)
    assert seq.output_text == tokenizer.decode(output_ids) == text
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)  # never half a character on the way


def test_the_texts_do_split_characters_across_tokens(tokenizer) -> None:
    """Guard for the test above: most of these texts put one character over several tokens."""
    split = [t for t in TEXTS if any("\ufffd" in tokenizer.decode([i]) for i in tokenizer.encode(t))]
    assert len(split) >= 4


def test_half_a_character_is_held_back_until_it_completes(tokenizer) -> None:
    ids = tokenizer.encode("a👍")
    assert len(ids) >= 3  # "a" then the emoji's 4 bytes over several tokens
    detok = IncrementalDetokenizer(tokenizer)
    seq = make_seq(tokenizer.encode("Say"))
    detok.start(seq)
    shown = []
    for token in ids:
        seq.output_token_ids.append(token)
        detok.append(seq)
        shown.append(seq.output_text)
    assert shown[0] == "a"
    assert all(text == "a" for text in shown[1:-1])  # nothing until the emoji is whole
    assert shown[-1] == "a👍"


def test_a_flush_gives_out_what_was_held(tokenizer) -> None:
    ids = tokenizer.encode("ok👍")[:-1]  # ends inside the emoji
    seq, _ = stream(tokenizer, tokenizer.encode("Hi"), ids)
    assert seq.output_text == tokenizer.decode(ids) and seq.output_text.endswith("\ufffd")


def test_special_tokens_are_skipped_unless_asked(tokenizer) -> None:
    ids = tokenizer.encode("Hello") + [2] + tokenizer.encode(" world, 世界")
    seq, _ = stream(tokenizer, tokenizer.encode("A"), ids)
    assert seq.output_text == tokenizer.decode(ids, skip_special_tokens=True) == "Hello world, 世界"
    seq, _ = stream(tokenizer, tokenizer.encode("A"), ids, skip_special_tokens=False)
    assert seq.output_text == tokenizer.decode(ids) == "Hello<|im_end|> world, 世界"


def test_the_prompt_gives_context_but_is_not_output(tokenizer) -> None:
    prompt = tokenizer.encode("The weather is")
    output = tokenizer.encode("The weather is sunny today")[len(prompt):]
    seq, _ = stream(tokenizer, prompt, output)
    assert seq.output_text == " sunny today"  # the leading space survives


def test_prompt_context_keeps_the_leading_space_of_sentencepiece_style_tokens() -> None:
    """Llama/Mistral-style (Metaspace) decoders drop the space of a sequence's first "▁word", so
    output tokens decoded without the prompt before them would lose the space between the two."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "▁again": 3, "!": 4}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    assert tokenizer.decode([2, 3]) == "world again"  # alone: no leading space
    seq, deltas = stream(tokenizer, [1], [2, 3, 4])
    assert deltas == [" world", " again", "!"]
    assert "Hello" + seq.output_text == tokenizer.decode([1, 2, 3, 4])


# ---- stop strings and held-back text ----------------------------------------------------------


def _seq_with_text(text: str, stop) -> Sequence:
    seq = make_seq([5], stop=stop)
    seq.output_text = text
    return seq


def test_find_stop_string_looks_only_at_what_the_new_text_completed() -> None:
    seq = _seq_with_text("abc STOP def", "STOP")
    assert find_stop_string(seq, new_chars=len("P def")) == ("STOP", 4)  # STOP ended inside the new text
    assert find_stop_string(seq, new_chars=len(" def")) is None  # it was complete before: seen already


def test_find_stop_string_returns_the_earliest_of_several() -> None:
    seq = _seq_with_text("one two three", ["e t", "three", "two"])  # earliest first: order must not decide
    assert find_stop_string(seq, new_chars=13) == ("e t", 2)


def test_visible_text_holds_back_a_possible_stop_string_prefix() -> None:
    seq = _seq_with_text("The end is ne", ["near", "x"])
    assert visible_text(seq) == "The end is"  # "ne" (and one more char) may yet become "near"
    seq.finish("length")
    assert visible_text(seq) == "The end is ne"
    assert visible_text(_seq_with_text("no stops", None)) == "no stops"
    assert visible_text(_seq_with_text("ab", "c")) == "ab"  # a one-character stop needs no hold


def test_streamed_text_only_grows_and_ends_as_the_full_decode(embedded) -> None:
    """Through the engine: every step's text extends the previous one, and the final text is
    the tokenizer's decode of the final tokens (special tokens skipped)."""
    llm = embedded.llm
    engine = llm.llm_engine
    messages = [{"role": "user", "content": "Write one sentence in French with accents, then one with an emoji."}]
    from loraplex.tokenizer import apply_chat_template

    prompt_ids = apply_chat_template(llm.get_tokenizer(), messages)
    engine.add_request("stream", {"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=24))
    texts = []
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts.append(out.outputs[0].text)
            final = out
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    tokens = final.outputs[0].token_ids
    assert final.outputs[0].text == llm.get_tokenizer().decode(tokens, skip_special_tokens=True)
    assert len(texts) == len(tokens)
