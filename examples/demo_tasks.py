"""The two demo tasks, text-to-SQL (`sql`) and person extraction (`json-extract`): their prompt forms,
vocabularies and seeded item generators, shared by the training script and the evaluation.

Every vocabulary (table names, column names, first names, last names, cities) is split once,
deterministically, into a training part and a held-out part (every fifth word is held out), so
an evaluation on held-out items asks about schemas, columns, people and cities the adapters never
saw: they must copy names from the prompt, not recall them.

    sql prompt     [user] Write a SQL query ... \\n\\n context: CREATE TABLE t (c TYPE, ...)\\n\\n question: Q [/user] [assistant]
    sql answer      SELECT ... [/assistant]
    person prompt  [user] Extract the person as JSON.\\n\\n text: S [/user] [assistant]
    person answer   {"name": "...", "age": 42, "city": "..."} [/assistant]

The stop string is `[/assistant]`; an answer is a space, the payload, a space and the stop string.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "heldout"]
STOP = "[/assistant]"
SQL_INSTRUCTION = "Write a SQL query to answer the question based on the table schema."
PERSON_INSTRUCTION = "Extract the person as JSON."
TASKS = ("sql", "json-extract")


def sql_prompt(schema: str, question: str) -> str:
    return f"[user] {SQL_INSTRUCTION}\n\n context: {schema}\n\n question: {question} [/user] [assistant]"


def person_prompt(text: str) -> str:
    return f"[user] {PERSON_INSTRUCTION}\n\n text: {text} [/user] [assistant]"


def answer_text(payload: str) -> str:
    """What the model is trained to write after the prompt (the stop string included)."""
    return f" {payload} {STOP}"


def split_words(words: tuple[str, ...], split: Split) -> tuple[str, ...]:
    """The training part (4 of 5 words) or the held-out part (every fifth word) of a vocabulary."""
    held = split == "heldout"
    return tuple(word for index, word in enumerate(words) if (index % 5 == 0) == held)


# ---------------------------------------------------------------------------------------------
# sql


TABLE_NOUNS = (
    "players", "teams", "albums", "songs", "movies", "books", "authors", "cities", "countries", "airports",
    "flights", "ships", "trains", "cars", "bikes", "schools", "students", "teachers", "courses", "hospitals",
    "doctors", "patients", "restaurants", "dishes", "recipes", "hotels", "museums", "paintings", "artists", "concerts",
    "festivals", "tournaments", "races", "drivers", "stadiums", "clubs", "leagues", "elections", "candidates", "companies",
    "employees", "products", "customers", "stores", "warehouses", "shipments", "invoices", "loans", "accounts", "banks",
    "stocks", "funds", "planets", "satellites", "rockets", "missions", "volcanoes", "rivers", "lakes", "mountains",
    "islands", "parks", "bridges", "buildings", "towers", "castles", "libraries", "universities", "journals", "articles",
    "podcasts", "games", "consoles", "phones", "laptops", "cameras", "apps", "websites", "servers", "sensors",
    "batteries", "engines", "aircraft", "helicopters", "buses", "stations", "tickets", "venues", "farms", "crops",
    "animals", "birds", "trees", "flowers", "wines", "cheeses", "bakeries", "gyms", "theaters", "orchestras",
)

NUMBER_COLUMNS = (
    "age", "price", "population", "score", "year", "height", "weight", "salary", "ranking", "points",
    "goals", "wins", "losses", "draws", "attendance", "capacity", "area", "elevation", "length", "width",
    "depth", "distance", "duration", "speed", "temperature", "budget", "revenue", "profit", "cost", "tax",
    "discount", "quantity", "stock_level", "votes", "seats", "floors", "rooms", "pages", "chapters", "episodes",
    "seasons", "tracks", "rating", "reviews", "likes", "followers", "downloads", "visits", "enrollment", "staff_count",
    "members", "passengers", "crew_size", "horsepower", "mileage", "engine_size", "battery_life", "storage_gb", "memory_gb", "screen_size",
    "weight_kg", "height_cm", "founded_year", "opening_year", "release_year", "birth_year", "total_games", "home_runs", "assists", "rebounds",
    "blocks", "steals", "laps", "medals", "gold_medals", "silver_medals", "bronze_medals", "caps", "appearances", "minutes_played",
    "calories", "protein", "sugar", "fat_grams", "fiber", "sodium", "humidity", "rainfall", "wind_speed", "altitude",
    "volume", "density", "voltage", "frequency", "bandwidth", "latency", "pixels", "shares", "dividend", "interest_rate",
    "loan_amount", "balance", "credit_score", "fare", "rent", "tuition", "grants", "patents", "branches", "fleet_size",
)

TEXT_COLUMNS = (
    "name", "city", "country", "team", "title", "genre", "director", "position", "school", "college",
    "club", "league", "venue", "stadium", "nationality", "language", "publisher", "author", "artist", "album",
    "record_label", "brand", "model", "color", "category", "department", "manager", "coach", "captain", "owner",
    "sponsor", "region", "state", "province", "district", "county", "street", "address", "surname", "first_name",
    "last_name", "nickname", "role", "status", "result", "opponent", "winner", "runner_up", "format", "platform",
    "network", "channel", "studio", "producer", "composer", "lyricist", "designer", "architect", "builder", "operator",
    "airline", "airport", "destination", "origin", "route", "station", "terminal", "vessel", "ship_type", "class_name",
    "grade", "level", "division", "conference", "party", "candidate", "incumbent", "notes", "surface", "tournament",
    "event", "competition", "sport", "instrument", "cuisine", "dish", "ingredient", "material", "species", "habitat",
    "family_name", "maker", "supplier", "vendor", "headquarters", "mascot", "motto", "anthem", "currency", "continent",
)

_SYLLABLES = (
    "ka", "lo", "ven", "mar", "ti", "sel", "ora", "bri", "dun", "ash", "mel", "kor", "pa", "zin", "ru", "tal", "e", "no",
    "gar", "vi", "lum", "tes", "ho", "qua", "ren", "do", "fi", "sar", "ul", "wen", "bex", "it", "mo", "lan", "tro", "cy",
)

_AGGREGATES = {
    "MAX": ("highest", "maximum", "largest"),
    "MIN": ("lowest", "minimum", "smallest"),
    "AVG": ("average", "mean"),
}


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # INTEGER, REAL or TEXT

    @property
    def phrase(self) -> str:
        return self.name.replace("_", " ")

    @property
    def numeric(self) -> bool:
        return self.type != "TEXT"


@dataclass(frozen=True)
class SqlItem:
    """One question about one table, its reference SQL, and the rows its database holds."""

    table: str
    columns: tuple[Column, ...]
    question: str
    sql: str
    rows: tuple[tuple[object, ...], ...]

    @property
    def schema(self) -> str:
        return f"CREATE TABLE {self.table} ({', '.join(f'{c.name} {c.type}' for c in self.columns)})"

    @property
    def prompt(self) -> str:
        return sql_prompt(self.schema, self.question)

    @property
    def answer(self) -> str:
        return answer_text(self.sql)


def sql_items(count: int, split: Split, seed: int) -> list[SqlItem]:
    """`count` seeded text-to-SQL items over invented schemas from the `split` vocabularies."""
    rng = random.Random(f"sql/{split}/{seed}")
    return [make_sql_item(rng, split) for _ in range(count)]


def make_sql_item(rng: random.Random, split: Split) -> SqlItem:
    nouns = split_words(TABLE_NOUNS, split)
    noun = rng.choice(nouns)
    table = noun if rng.random() < 0.6 else f"{noun}_{rng.randint(1, 99)}"
    columns = _columns(rng, split)
    rows = _rows(rng, columns)
    question, sql = _question(rng, table, noun.replace("_", " "), columns, rows)
    return SqlItem(table, columns, question, sql, rows)


def _columns(rng: random.Random, split: Split) -> tuple[Column, ...]:
    texts = rng.sample(split_words(TEXT_COLUMNS, split), rng.randint(1, 3))
    numbers = rng.sample(split_words(NUMBER_COLUMNS, split), rng.randint(1, 3))
    columns = [Column(name, "TEXT") for name in texts] + [Column(name, rng.choice(("INTEGER", "REAL"))) for name in numbers]
    rng.shuffle(columns)
    return tuple(columns)


def _rows(rng: random.Random, columns: tuple[Column, ...]) -> tuple[tuple[object, ...], ...]:
    """10-16 rows: numbers distinct within a column (ORDER BY has no ties), text from a few values
    per column, each used at least twice (so WHERE and GROUP BY find several rows)."""
    count = rng.randint(10, 16)
    values: list[list[object]] = []
    for column in columns:
        if column.type == "INTEGER":
            values.append(rng.sample(range(1, 100), count))
        elif column.type == "REAL":
            values.append([round(v / 10, 1) for v in rng.sample(range(10, 1000), count)])
        else:
            pool = [pseudo_word(rng) for _ in range(rng.randint(2, 4))]
            cells = pool * 2 + [rng.choice(pool) for _ in range(count - 2 * len(pool))]
            rng.shuffle(cells)
            values.append(cells)
    return tuple(zip(*values))


def pseudo_word(rng: random.Random) -> str:
    """An invented proper name (one or two capitalised words), never a real column or table name."""
    def word() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    return word() if rng.random() < 0.8 else f"{word()} {word()}"


def an(phrase: str) -> str:
    """The phrase with its indefinite article: "a rating", "an enrollment"."""
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _question(rng: random.Random, table: str, things: str, columns: tuple[Column, ...],
              rows: tuple[tuple[object, ...], ...]) -> tuple[str, str]:
    """A (question, reference SQL) pair of a randomly chosen kind that the schema supports."""
    texts = [c for c in columns if not c.numeric]
    numbers = [c for c in columns if c.numeric]
    index = {c.name: i for i, c in enumerate(columns)}

    def cell(column: Column) -> object:
        return rng.choice(rows)[index[column.name]]

    def other(than: Column) -> Column:
        return rng.choice([c for c in columns if c != than] or [than])

    def threshold(column: Column, op: str) -> object:
        """A row's value that leaves some rows on the asked side of the comparison."""
        ordered = sorted(row[index[column.name]] for row in rows)
        half = len(ordered) // 2
        value = rng.choice(ordered[:half] if op == ">" else ordered[half:])
        return int(value) if column.type == "INTEGER" else value

    kind = rng.choice(("select_text", "select_number", "count", "aggregate", "order", "group", "columns"))
    text, number = rng.choice(texts), rng.choice(numbers)
    a, b, n = text.phrase, text.name, number.phrase

    if kind == "select_text":
        target = other(text)
        value = cell(text)
        question = rng.choice((
            f"What is the {target.phrase} when the {a} is {value}?",
            f"Which {target.phrase} has {an(a)} of {value}?",
            f"List the {target.phrase} of the {things} whose {a} is {value}.",
            f"Give the {target.phrase} for {a} {value}.",
        ))
        return question, f"SELECT {target.name} FROM {table} WHERE {b} = '{value}'"

    if kind == "select_number":
        target = other(number)
        op = rng.choice((">", "<", "=") if number.type == "INTEGER" else (">", "<"))
        value = cell(number) if op == "=" else threshold(number, op)
        question = rng.choice({
            ">": (f"Which {target.phrase} have {an(n)} greater than {value}?", f"List the {target.phrase} of {things} with {n} above {value}.",
                  f"What are the {target.phrase} values where the {n} is more than {value}?"),
            "<": (f"Which {target.phrase} have {an(n)} less than {value}?", f"List the {target.phrase} of {things} with {n} below {value}.",
                  f"What are the {target.phrase} values where the {n} is under {value}?"),
            "=": (f"What is the {target.phrase} when the {n} is {value}?", f"Which {target.phrase} has {an(n)} of exactly {value}?"),
        }[op])
        return question, f"SELECT {target.name} FROM {table} WHERE {number.name} {op} {value}"

    if kind == "count":
        form = rng.choice(("text", "number", "all"))
        if form == "text":
            value = cell(text)
            question = rng.choice((f"How many {things} have {an(a)} of {value}?", f"Count the {things} whose {a} is {value}.",
                                   f"What is the number of {things} with {a} {value}?"))
            return question, f"SELECT COUNT(*) FROM {table} WHERE {b} = '{value}'"
        if form == "number":
            op = rng.choice((">", "<"))
            value = threshold(number, op)
            word = rng.choice(("greater than", "above", "more than") if op == ">" else ("less than", "below", "under"))
            question = rng.choice((f"How many {things} have {an(n)} {word} {value}?", f"Count the {things} with {n} {word} {value}."))
            return question, f"SELECT COUNT(*) FROM {table} WHERE {number.name} {op} {value}"
        question = rng.choice((f"How many {things} are there?", f"Count all {things}.", "How many rows does the table have?"))
        return question, f"SELECT COUNT(*) FROM {table}"

    if kind == "aggregate":
        function = rng.choice(tuple(_AGGREGATES))
        word = rng.choice(_AGGREGATES[function])
        if rng.random() < 0.5:
            question = rng.choice((f"What is the {word} {n}?", f"What is the {word} {n} of all {things}?", f"Find the {word} {n}."))
            return question, f"SELECT {function}({number.name}) FROM {table}"
        value = cell(text)
        question = rng.choice((f"What is the {word} {n} when the {a} is {value}?", f"What is the {word} {n} of {things} with {a} {value}?"))
        return question, f"SELECT {function}({number.name}) FROM {table} WHERE {b} = '{value}'"

    if kind == "order":
        target = other(number)
        descending = rng.random() < 0.5
        word = rng.choice(("highest", "largest") if descending else ("lowest", "smallest"))
        limit = rng.choice((1, 1, 2, 3, 3, 5))
        order = "DESC" if descending else "ASC"
        if limit == 1:
            question = rng.choice((f"Which {target.phrase} has the {word} {n}?", f"What is the {target.phrase} with the {word} {n}?"))
        else:
            question = rng.choice((f"List the {target.phrase} of the {limit} {things} with the {word} {n}.",
                                   f"What are the {limit} {target.phrase} values with the {word} {n}?"))
        return question, f"SELECT {target.name} FROM {table} ORDER BY {number.name} {order} LIMIT {limit}"

    if kind == "group":
        if rng.random() < 0.5:
            question = rng.choice((f"How many {things} are there for each {a}?", f"Count the {things} in each {a}.",
                                   f"For each {a}, how many {things} are there?"))
            return question, f"SELECT {b}, COUNT(*) FROM {table} GROUP BY {b}"
        function = rng.choice(tuple(_AGGREGATES))
        word = rng.choice(_AGGREGATES[function])
        question = rng.choice((f"What is the {word} {n} for each {a}?", f"For each {a}, what is the {word} {n}?"))
        return question, f"SELECT {b}, {function}({number.name}) FROM {table} GROUP BY {b}"

    # columns
    first = rng.choice(columns)
    second = other(first)
    if second == first or rng.random() < 0.4:
        question = rng.choice((f"List the {first.phrase} of all {things}.", f"Show every {first.phrase}."))
        return question, f"SELECT {first.name} FROM {table}"
    question = rng.choice((f"Show the {first.phrase} and {second.phrase} of all {things}.",
                           f"List the {first.phrase} and the {second.phrase} of every row."))
    return question, f"SELECT {first.name}, {second.name} FROM {table}"


# ---------------------------------------------------------------------------------------------
# json-extract


FIRST_NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiroshi", "Ingrid", "Jamal",
    "Keiko", "Liam", "Mariana", "Nikolai", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tamara",
    "Umar", "Valentina", "Wei", "Ximena", "Yusuf", "Zofia", "Aiden", "Beatriz", "Carlos", "Daria",
    "Emeka", "Fatima", "Gustavo", "Hana", "Ivan", "Julia", "Kwame", "Leila", "Mateo", "Noor",
    "Oscar", "Priya", "Rafael", "Sofia", "Tomas", "Uma", "Victor", "Wanjiru", "Yara", "Zane",
    "Anika", "Bernard", "Clara", "Diego", "Esther", "Felix", "Gloria", "Hugo", "Isabel", "Jonas",
    "Kofi", "Lucia", "Marcus", "Nadia", "Omar", "Paula", "Reza", "Sienna", "Theo", "Ursula",
    "Vera", "Walter", "Xavier", "Yuki", "Zara", "Amara", "Boris", "Camila", "Dev", "Elif",
    "Finn", "Gabriela", "Henrik", "Ines", "Jorge", "Kira", "Lars", "Mei", "Nils", "Orla",
    "Pablo", "Rania", "Stefan", "Talia", "Ulrich", "Vivian", "Wesley", "Yasmin", "Zoltan", "Ada",
)

LAST_NAMES = (
    "Okafor", "Lindqvist", "Moreau", "Tanaka", "Kowalski", "Haddad", "Fernandes", "Novak", "Schmidt", "Rossi",
    "Nakamura", "Petrov", "Gallagher", "Mensah", "Ortega", "Berg", "Castillo", "Dubois", "Eriksen", "Fischer",
    "Gonzalez", "Horvath", "Iyer", "Jensen", "Kim", "Larsen", "Mbeki", "Nguyen", "Oliveira", "Park",
    "Quintero", "Reyes", "Sato", "Torres", "Ueda", "Varga", "Walsh", "Yilmaz", "Zhang", "Abbasi",
    "Bianchi", "Chen", "Delgado", "Engel", "Farouk", "Grant", "Huang", "Ibrahim", "Jovanovic", "Kaur",
    "Lopez", "Murphy", "Nilsson", "Osei", "Patel", "Ramos", "Silva", "Takahashi", "Usman", "Vogel",
    "Weber", "Yamamoto", "Zimmermann", "Andersen", "Brennan", "Costa", "Dimitrov", "Evans", "Fuentes", "Gupta",
    "Hoffmann", "Ivanova", "Jung", "Keller", "Lambert", "Marin", "Nowak", "OBrien", "Popescu", "Romero",
    "Santos", "Tran", "Ulloa", "Vasquez", "Wright", "Young", "Zapata", "Aydin", "Baker", "Cruz",
    "Dang", "Ekwueme", "Fontaine", "Gomez", "Hansen", "Ito", "Joshi", "Khan", "Lund", "Mendes",
)

CITIES = (
    "Lisbon", "Nairobi", "Osaka", "Toronto", "Krakow", "Lima", "Seville", "Hanoi", "Melbourne", "Bergen",
    "Marseille", "Accra", "Bogota", "Dublin", "Porto", "Chennai", "Montreal", "Valencia", "Busan", "Tbilisi",
    "Auckland", "Rotterdam", "Cusco", "Tunis", "Glasgow", "Kyoto", "Quito", "Lyon", "Leipzig", "Manila",
    "Cape Town", "Buenos Aires", "San Diego", "New Orleans", "Rio de Janeiro", "Hong Kong", "Kuala Lumpur", "Tel Aviv", "Mexico City", "Salt Lake City",
    "Athens", "Bratislava", "Cairo", "Dakar", "Edinburgh", "Florence", "Geneva", "Havana", "Istanbul", "Jakarta",
    "Kampala", "Lagos", "Madrid", "Naples", "Oslo", "Prague", "Riga", "Santiago", "Tallinn", "Utrecht",
    "Vienna", "Warsaw", "Yerevan", "Zagreb", "Antwerp", "Belgrade", "Casablanca", "Denver", "Eindhoven", "Fukuoka",
    "Gdansk", "Helsinki", "Innsbruck", "Johannesburg", "Kazan", "Ljubljana", "Malmo", "Nagoya", "Odessa", "Perth",
    "Reykjavik", "Sapporo", "Turin", "Uppsala", "Vilnius", "Wellington", "Zurich", "Adelaide", "Bilbao", "Calgary",
    "Dresden", "Austin", "Bordeaux", "Chicago", "Delhi", "Goa", "Hamburg", "Izmir", "Jaipur", "Kiev",
)

JOBS = ("nurse", "teacher", "carpenter", "pilot", "chef", "lawyer", "baker", "designer", "mechanic", "librarian", "painter", "farmer")

PERSON_TEMPLATES = (
    "{name} is {age} years old and lives in {city}.",
    "{name}, {age}, lives in {city}.",
    "At {age}, {name} moved to {city} to start a new job.",
    "{name} from {city} celebrated turning {age} last week.",
    "Meet {name}: {age} years old, based in {city}.",
    "Our new neighbour {name} ({age}) comes from {city}.",
    "{city} resident {name} is {age}.",
    "{name} has lived in {city} since childhood and is now {age}.",
    "The {age}-year-old {name} works as a {job} in {city}.",
    "Born and raised in {city}, {name} is {age} years old.",
    "{name} ({age}) is a {job} living in {city}.",
    "According to the records, {name} is aged {age} and resides in {city}.",
    "Yesterday {name}, a {age}-year-old {job}, flew home to {city}.",
    "{name} turned {age} this spring and still works in {city} as a {job}.",
)


#: Capitalised words of the SQL vocabularies ("Players", "Genre"): stand-in names for training only.
_COMMON_WORDS = tuple(sorted({w.capitalize() for w in TABLE_NOUNS + TEXT_COLUMNS + NUMBER_COLUMNS if "_" not in w}))


@dataclass(frozen=True)
class PersonItem:
    """One sentence about one person and the three facts to extract from it."""

    text: str
    name: str
    age: int
    city: str

    @property
    def prompt(self) -> str:
        return person_prompt(self.text)

    @property
    def fields(self) -> dict[str, object]:
        return {"name": self.name, "age": self.age, "city": self.city}

    @property
    def answer(self) -> str:
        return answer_text(json.dumps(self.fields))


def person_items(count: int, split: Split, seed: int) -> list[PersonItem]:
    """`count` seeded person sentences naming people and cities from the `split` vocabularies."""
    rng = random.Random(f"json-extract/{split}/{seed}")
    firsts, lasts, cities = (split_words(words, split) for words in (FIRST_NAMES, LAST_NAMES, CITIES))
    # Training also names invented people and places, so that the adapter learns to copy whatever
    # the text says rather than to recall (or "correct" towards) the names it has seen: made-up
    # words, and capitalised common words, which are one token after a space in the text but
    # must be spelled without it after the JSON's opening quote.
    invent = 0.4 if split == "train" else 0.0

    def pick(words: tuple[str, ...]) -> str:
        if rng.random() >= invent:
            return rng.choice(words)
        return pseudo_word(rng) if rng.random() < 0.5 else rng.choice(_COMMON_WORDS)

    items = []
    for _ in range(count):
        name = f"{pick(firsts)} {pick(lasts)}"
        age, city = rng.randint(18, 90), pick(cities)
        text = rng.choice(PERSON_TEMPLATES).format(name=name, age=age, city=city, job=rng.choice(JOBS))
        items.append(PersonItem(text, name, age, city))
    return items


def task_items(task: str, count: int, split: Split, seed: int) -> list[SqlItem] | list[PersonItem]:
    """Items of the task named `task` ("sql" or "json-extract")."""
    if task == "sql":
        return sql_items(count, split, seed)
    if task == "json-extract":
        return person_items(count, split, seed)
    raise ValueError(f"unknown demo task {task!r}; choose one of {', '.join(TASKS)}")
