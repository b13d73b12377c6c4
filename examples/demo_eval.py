"""Held-out evaluation of the demo adapters: scoring one answer, and the rates of each adapter and
of the base model on the same held-out items, offline with loraplex's Python API or over HTTP.

    python examples/demo_eval.py [--adapters examples/adapters/SmolLM2-135M-Instruct] [--items 50] [--seed 0]
    python examples/demo_eval.py --server http://127.0.0.1:8000     # after `make serve`

Scoring:
- sql: the answer's SQL and the reference SQL run with sqlite3 on a database built from the
  item's schema and rows; correct when they return the same rows (in order only when the
  reference has ORDER BY). An answer that does not run is wrong.
- json-extract: the answer parses as a JSON object whose name, age (an integer) and city are all
  the item's.

The scoring functions take the answer's text as the server or `LLM.generate` returns it (the stop
string excluded), so tests over HTTP score exactly as the offline evaluation does.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from demo_tasks import STOP, TASKS, PersonItem, SqlItem, task_items

if TYPE_CHECKING:
    from loraplex import LLM

ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters" / "SmolLM2-135M-Instruct"
MAX_TOKENS = 48  # the longest reference answer is about 30 tokens
_SQL_STEP_BUDGET = 200  # progress-handler calls (1000 VM steps each) before a query is cut off


def heldout_items(task: str, count: int, seed: int = 0) -> list[SqlItem] | list[PersonItem]:
    """`count` items of `task` whose schemas, columns, people and cities training never used."""
    return task_items(task, count, "heldout", seed)


def sampling_params():
    """Greedy decoding up to the stop string, as the evaluation and the demo use it."""
    from loraplex import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=[STOP])


def is_correct(item: SqlItem | PersonItem, text: str) -> bool:
    """Whether `text` (a generated answer, stop string excluded) answers `item` correctly."""
    if isinstance(item, SqlItem):
        return sql_is_correct(item, text)
    return person_is_correct(item, text)


# ---------------------------------------------------------------------------------------------
# sql


def sql_is_correct(item: SqlItem, text: str) -> bool:
    expected = run_sql(item, item.sql)
    if expected is None:
        raise ValueError(f"the reference SQL {item.sql!r} does not run on its own schema {item.schema!r}")
    got = run_sql(item, _payload(text))
    if got is None:
        return False
    if "ORDER BY" in item.sql.upper():
        return got == expected
    return sorted(got, key=repr) == sorted(expected, key=repr)


def run_sql(item: SqlItem, sql: str) -> list[tuple[object, ...]] | None:
    """The rows `sql` returns on the item's database (floats rounded), None when it fails."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.execute(item.schema)
        marks = ", ".join("?" for _ in item.columns)
        connection.executemany(f"INSERT INTO {item.table} VALUES ({marks})", item.rows)
        steps = iter(range(_SQL_STEP_BUDGET))
        connection.set_progress_handler(lambda: next(steps, None) is None, 1000)  # a runaway query stops
        try:
            rows = connection.execute(sql).fetchall()
        except (sqlite3.Error, sqlite3.Warning, ValueError):  # bad SQL, several statements, NUL bytes
            return None
    finally:
        connection.close()
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row) for row in rows]


# ---------------------------------------------------------------------------------------------
# json-extract


def person_is_correct(item: PersonItem, text: str) -> bool:
    try:
        value = json.loads(_payload(text))
    except ValueError:
        return False
    if not isinstance(value, dict):
        return False
    age = value.get("age")
    return (value.get("name") == item.name and value.get("city") == item.city
            and isinstance(age, int) and not isinstance(age, bool) and age == item.age)


def _payload(text: str) -> str:
    """The answer without surrounding spaces and a stop string, should one have been kept."""
    text = text.strip()
    if text.endswith(STOP):
        text = text[: -len(STOP)].rstrip()
    return text


# ---------------------------------------------------------------------------------------------
# evaluation, offline or over HTTP


@dataclass(frozen=True)
class Score:
    task: str
    adapter: str | None  # None: the base model
    correct: int
    total: int

    @property
    def rate(self) -> float:
        return self.correct / self.total

    def __str__(self) -> str:
        who = f"adapter {self.adapter!r}" if self.adapter else "base model"
        return f"{self.task:13s} {who:24s} {self.correct:3d}/{self.total:<3d} = {self.rate:.0%}"


def evaluate_offline(llm: LLM, adapters: dict[str, str | Path], count: int, seed: int = 0) -> list[Score]:
    """Rates of each task's adapter (`adapters` maps task -> adapter directory) and of the base
    model, on `count` held-out items per task, all generated in one mixed batch."""
    from loraplex import LoRARequest

    requests = {task: LoRARequest(task, lora_id, str(path)) for lora_id, (task, path) in enumerate(adapters.items(), start=1)}
    runs: list[tuple[str, LoRARequest | None]] = [(task, lora) for task, lora in requests.items()]
    runs += [(task, None) for task in requests]
    items = {task: heldout_items(task, count, seed) for task in requests}
    prompts = [item.prompt for task, _ in runs for item in items[task]]
    loras = [lora for task, lora in runs for _ in items[task]]
    texts = iter([out.outputs[0].text for out in llm.generate(prompts, sampling_params(), use_tqdm=False, lora_request=loras)])
    return [score_answers(task, lora.lora_name if lora else None, items[task], [next(texts) for _ in items[task]])
            for task, lora in runs]


def evaluate_server(base_url: str, base_model: str, count: int, seed: int = 0, concurrency: int = 16) -> list[Score]:
    """Rates of each task's adapter (served under the task's name) and of the base model (served
    as `base_model`), on `count` held-out items per task, asked of the OpenAI-compatible server at
    `base_url` (`http://host:port`) by `concurrency` clients at once."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="EMPTY", max_retries=0, timeout=600.0)
    runs = [(task, task) for task in TASKS] + [(task, base_model) for task in TASKS]  # (task, model asked)
    items = {task: heldout_items(task, count, seed) for task in TASKS}

    def answer(model: str, prompt: str) -> str:
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0, stop=[STOP])
        return reply.choices[0].text

    with client, ThreadPoolExecutor(concurrency) as pool:
        texts = {(task, model): list(pool.map(answer, [model] * count, [item.prompt for item in items[task]]))
                 for task, model in runs}
    return [score_answers(task, None if model == base_model else model, items[task], texts[(task, model)])
            for task, model in runs]


def score_answers(task: str, adapter: str | None, items: Sequence[SqlItem | PersonItem], texts: Sequence[str]) -> Score:
    """The Score of answers `texts` to `items` (however they were generated: offline, over HTTP)."""
    if len(items) != len(texts):
        raise ValueError(f"{len(texts)} answers for {len(items)} items; give one answer per item")
    return Score(task, adapter, sum(is_correct(item, text) for item, text in zip(items, texts)), len(items))


def demo_llm(max_lora_rank: int) -> LLM:
    """The embedded model with room for both demo adapters at once."""
    from loraplex import LLM

    return LLM(enable_lora=True, max_loras=2, max_lora_rank=max_lora_rank)


def adapter_rank(path: str | Path) -> int:
    return int(json.loads((Path(path) / "adapter_config.json").read_text())["r"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Held-out rates of the demo adapters and of the base model.")
    parser.add_argument("--adapters", type=Path, default=ADAPTERS_DIR, help="directory holding sql/ and json-extract/")
    parser.add_argument("--items", type=int, default=50, help="held-out items per task")
    parser.add_argument("--seed", type=int, default=0, help="seed of the held-out items")
    parser.add_argument("--server", metavar="URL", help="ask a running server instead (e.g. http://127.0.0.1:8000 "
                        "after `make serve`): the adapters by their task names, the base model by --served-model-name")
    parser.add_argument("--served-model-name", default="SmolLM2-135M-Instruct", help="the server's name of the base model")
    args = parser.parse_args(argv)
    if args.server:
        scores = evaluate_server(args.server.rstrip("/"), args.served_model_name, args.items, args.seed)
    else:
        adapters = {task: args.adapters / task for task in TASKS}
        scores = evaluate_offline(demo_llm(max(adapter_rank(path) for path in adapters.values())), adapters, args.items, args.seed)
    for score in scores:
        print(score)
    return 0


if __name__ == "__main__":
    sys.exit(main())
