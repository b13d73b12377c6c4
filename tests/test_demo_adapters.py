"""The demo adapters under examples/adapters/: their held-out data, their scoring, the committed
files, and their rates against the base model's, asked of `make serve` over HTTP."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import demo_eval  # noqa: E402
import demo_tasks  # noqa: E402
from demo_tasks import PersonItem, SqlItem  # noqa: E402

ADAPTERS = {task: demo_eval.ADAPTERS_DIR / task for task in demo_tasks.TASKS}
HELDOUT_ITEMS = 24  # per task, for the adapter and for the base model alike


# ---------------------------------------------------------------------------------------------
# data


def test_heldout_items_use_no_training_word() -> None:
    train = {
        "tables": set(demo_tasks.split_words(demo_tasks.TABLE_NOUNS, "train")),
        "columns": set(demo_tasks.split_words(demo_tasks.TEXT_COLUMNS + demo_tasks.NUMBER_COLUMNS, "train")),
    }
    for item in demo_eval.heldout_items("sql", 200):
        assert re.sub(r"_\d+$", "", item.table) not in train["tables"], item.table
        assert not {c.name for c in item.columns} & train["columns"], item.schema
    first, last, cities = (set(demo_tasks.split_words(words, "train")) for words in
                           (demo_tasks.FIRST_NAMES, demo_tasks.LAST_NAMES, demo_tasks.CITIES))
    for person in demo_eval.heldout_items("json-extract", 200):
        given, family = person.name.split(" ")
        assert given not in first and family not in last and person.city not in cities, person.text
    # the split is a partition: every word is in exactly one part
    words = demo_tasks.CITIES
    assert sorted(demo_tasks.split_words(words, "train") + demo_tasks.split_words(words, "heldout")) == sorted(words)


def test_items_are_seeded_and_follow_the_prompt_forms() -> None:
    assert demo_tasks.sql_items(5, "train", 3) == demo_tasks.sql_items(5, "train", 3)
    assert demo_tasks.sql_items(5, "train", 3) != demo_tasks.sql_items(5, "train", 4)
    sql = demo_tasks.sql_items(1, "train", 0)[0]
    assert sql.prompt == (
        "[user] Write a SQL query to answer the question based on the table schema.\n\n"
        f" context: {sql.schema}\n\n question: {sql.question} [/user] [assistant]"
    )
    assert sql.schema.startswith(f"CREATE TABLE {sql.table} (") and sql.answer == f" {sql.sql} [/assistant]"
    person = demo_tasks.person_items(1, "train", 0)[0]
    assert person.prompt == f"[user] Extract the person as JSON.\n\n text: {person.text} [/user] [assistant]"
    assert person.answer == f' {{"name": "{person.name}", "age": {person.age}, "city": "{person.city}"}} [/assistant]'


def test_every_reference_sql_runs_and_finds_rows() -> None:
    kinds = set()
    for item in demo_tasks.sql_items(300, "train", 0) + demo_eval.heldout_items("sql", 300):
        rows = demo_eval.run_sql(item, item.sql)
        assert rows, f"{item.sql!r} on {item.schema!r} returns no rows"
        assert all(None not in row for row in rows), item.sql  # an aggregate over no row would be NULL
        kinds.add(next(word for word in ("GROUP BY", "ORDER BY", "COUNT", "MAX", "MIN", "AVG", "WHERE", "SELECT") if word in item.sql))
    assert kinds == {"GROUP BY", "ORDER BY", "COUNT", "MAX", "MIN", "AVG", "WHERE", "SELECT"}


# ---------------------------------------------------------------------------------------------
# scoring


def _sql_item(sql: str) -> SqlItem:
    columns = (demo_tasks.Column("team", "TEXT"), demo_tasks.Column("points", "INTEGER"))
    rows = (("Kalo", 3), ("Venti", 9), ("Kalo", 5), ("Marsel", 1))
    return SqlItem("games_7", columns, "a question", sql, rows)


def test_sql_scoring_compares_the_rows_each_query_returns() -> None:
    where = _sql_item("SELECT points FROM games_7 WHERE team = 'Kalo'")
    assert demo_eval.is_correct(where, " SELECT points FROM games_7 WHERE team = 'Kalo' ")
    assert demo_eval.is_correct(where, "SELECT points FROM games_7 WHERE points IN (5, 3)")  # same rows, other order
    assert demo_eval.is_correct(where, "SELECT points FROM games_7 WHERE team = 'Kalo' [/assistant]")
    assert not demo_eval.is_correct(where, "SELECT team FROM games_7 WHERE team = 'Kalo'")
    assert not demo_eval.is_correct(where, "SELECT points FROM games_7 WHERE team = 'kalo'")
    assert not demo_eval.is_correct(where, "SELECT points FROM players WHERE team = 'Kalo'")  # no such table
    assert not demo_eval.is_correct(where, "SELECT points FROM games_7 WHERE team = 'Kalo'; DROP TABLE games_7")
    assert not demo_eval.is_correct(where, "The answer is 3 and 5.")
    assert not demo_eval.is_correct(where, "")
    ordered = _sql_item("SELECT team FROM games_7 ORDER BY points DESC LIMIT 3")
    assert demo_eval.is_correct(ordered, "SELECT team FROM games_7 ORDER BY points DESC LIMIT 3")
    assert not demo_eval.is_correct(ordered, "SELECT team FROM games_7 ORDER BY points ASC LIMIT 3")
    assert not demo_eval.is_correct(ordered, "SELECT team FROM games_7 WHERE points > 2")  # the same rows, unordered
    average = _sql_item("SELECT AVG(points) FROM games_7")
    assert demo_eval.is_correct(average, "SELECT SUM(points) * 1.0 / COUNT(*) FROM games_7")
    runaway = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT COUNT(*) FROM n"
    assert not demo_eval.is_correct(average, runaway)  # cut off, not hung


def test_person_scoring_needs_json_with_all_three_fields_right() -> None:
    item = PersonItem("Ada Lund, 33, lives in Goa.", "Ada Lund", 33, "Goa")
    assert demo_eval.is_correct(item, ' {"name": "Ada Lund", "age": 33, "city": "Goa"} ')
    assert demo_eval.is_correct(item, '{"city": "Goa", "age": 33, "name": "Ada Lund"}')
    assert not demo_eval.is_correct(item, '{"name": "Ada Lund", "age": "33", "city": "Goa"}')
    assert not demo_eval.is_correct(item, '{"name": "Ada", "age": 33, "city": "Goa"}')
    assert not demo_eval.is_correct(item, '{"name": "Ada Lund", "age": 33}')
    assert not demo_eval.is_correct(item, '{"name": "Ada Lund", "age": 33, "city": "Goa"')
    assert not demo_eval.is_correct(item, '["Ada Lund", 33, "Goa"]')
    assert not demo_eval.is_correct(item, "Ada Lund is 33 and lives in Goa.")


# ---------------------------------------------------------------------------------------------
# the committed adapters


@pytest.mark.parametrize("task", demo_tasks.TASKS)
def test_committed_adapter_is_a_small_plain_peft_lora(task: str) -> None:
    path = ADAPTERS[task]
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (path / "adapter_model.safetensors").stat().st_size <= 10 * 1024 * 1024
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"].endswith("/SmolLM2-135M-Instruct")
    assert not config["modules_to_save"] and config["bias"] == "none" and not config["use_dora"]
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
        names = list(weights.keys())
        assert len(names) == 30 * 7 * 2  # A and B of seven projections in each of the 30 layers
        assert all(".lora_A." in n or ".lora_B." in n for n in names)
        assert {str(weights.get_slice(n).get_dtype()) for n in names} == {"BF16"}


@pytest.fixture(scope="module")
def scores(make_serve) -> dict[tuple[str, str | None], demo_eval.Score]:
    """Held-out rates of each adapter and of the base model, asked of `make serve` over HTTP."""
    scores = demo_eval.evaluate_server(make_serve.url, "SmolLM2-135M-Instruct", HELDOUT_ITEMS)
    return {(s.task, s.adapter): s for s in scores}


@pytest.mark.parametrize("task", demo_tasks.TASKS)
def test_adapter_answers_heldout_items_the_base_model_cannot(scores, task: str) -> None:
    adapter, base = scores[(task, task)], scores[(task, None)]
    assert adapter.rate >= 0.8, str(adapter)
    assert base.rate <= 0.2, str(base)

