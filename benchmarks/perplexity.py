"""Perplexity of a built-in text along the decode path: how much quantized weights cost in quality.

Each token of the text after the first is scored by a decode step, as generation runs it (a
quantized model reads its GGUF weights in decode steps only; a prefill would score the text
with the float GEMM): the prompt is the first token, and a logits processor records the
log-probability the model gives the text's next token, then forces that token. Perplexity =
exp(-mean log-probability). Used by bench_llamacpp.py; `python perplexity.py` prints float32's
and quantization="gguf"'s for the embedded model.
"""

from __future__ import annotations

import math

import torch

# A plain, varied English text (~300 tokens), written for this benchmark.
TEXT = (
    "The lighthouse stood at the end of a narrow spit of rock, and for most of the year nobody visited it. "
    "Its keeper, a retired schoolteacher named Ada, kept a logbook in which she wrote down the weather, the "
    "ships she saw and the birds that rested on the railing. In spring the terns came back first, then the "
    "gannets, and by June the cliffs below were loud from dawn to dusk. Ada liked to say that the sea never "
    "repeated itself: the same wind could bring a flat grey calm one morning and white breakers the next. "
    "Every evening at sunset she climbed the ninety-two steps to light the lamp, although the lamp had been "
    "automatic for twenty years. She checked the lens for salt, wiped the brass and counted the seconds "
    "between the flashes: three short, one long. Then she sat by the window with a cup of tea and a book, "
    "usually a history of navigation or a collection of letters, and watched the beam sweep across the "
    "water. When storms came she did not sleep. She listened to the radio, marked the position of every "
    "vessel on a chart and, twice in eleven years, called the coast guard because a small boat had lost its "
    "way in the fog. Both crews were found, cold and frightened but alive, and both sent her a postcard the "
    "following Christmas. She pinned the cards above her desk, next to a faded photograph of her first class."
)


def decode_path_logprobs(llm, ids: list[int], lora_request=None) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1, each scored by a decode step of `llm` (a loraplex LLM):
    the prompt is ids[0], and a logits processor records the log-probability of the next id, then
    forces it."""
    from loraplex import SamplingParams

    logprobs: list[float] = []

    def teacher(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        target = ids[1 + len(output_ids)]
        logprobs.append(float(torch.log_softmax(logits.float(), dim=-1)[target]))
        forced = torch.full_like(logits, -math.inf)
        forced[target] = 0.0
        return forced

    params = SamplingParams(temperature=0.0, max_tokens=len(ids) - 1, min_tokens=len(ids) - 1, ignore_eos=True,
                            logits_processors=[teacher])
    llm.generate({"prompt_token_ids": ids[:1]}, params, lora_request=lora_request, use_tqdm=False)
    return logprobs


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


def decode_path_perplexity(llm, text: str = TEXT) -> float:
    """The perplexity of `text`'s tokens after the first, each scored by a decode step of `llm`."""
    return perplexity(decode_path_logprobs(llm, llm.llm_engine.tokenizer.encode(text)))


def main() -> None:
    from loraplex import LLM
    from loraplex.model_loader import embedded_model_dir

    model = str(embedded_model_dir())
    for quantization in (None, "gguf"):
        llm = LLM(model, device="cpu", dtype="float32", quantization=quantization)
        print(f"{quantization or 'float32':>8}: perplexity {decode_path_perplexity(llm):.3f}")


if __name__ == "__main__":
    main()
