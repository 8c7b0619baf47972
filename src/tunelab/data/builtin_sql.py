"""builtin:sql — text-to-SQL rows in the schema of b-mc2/sql-create-context, generated here.

Each row has `question` (English), `context` (a CREATE TABLE statement) and `answer` (a
SQLite query valid against that context). Tables, column types, conditions, aggregates,
ordering and phrasings vary; the same seed always gives the same rows.
"""

import random

FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Felix", "Grace", "Hugo", "Iris", "Jonas",
         "Kira", "Liam", "Maya", "Noah", "Olga", "Pablo", "Rosa", "Sam", "Tara", "Victor"]
LAST = ["Smith", "Garcia", "Chen", "Muller", "Rossi", "Silva", "Kim", "Novak", "Brown", "Lopez"]
CITIES = ["Boston", "Lyon", "Osaka", "Porto", "Denver", "Krakow", "Austin", "Leeds", "Turin", "Quebec"]
COUNTRIES = ["France", "Japan", "Brazil", "Canada", "Kenya", "Norway", "Chile", "India", "Spain", "Egypt"]


def _person(rng):
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def _pick(options):
    return lambda rng: rng.choice(options)


def _int(lo, hi):
    return lambda rng: rng.randint(lo, hi)


def _real(lo, hi):
    return lambda rng: round(rng.uniform(lo, hi), 1)


# Each theme: (what a row is, plural, [(column, SQL type, value maker, words for the column)]).
# The first column names the row's subject and is what "which ..." questions ask for.
THEMES = [
    ("employee", "employees", [
        ("name", "VARCHAR", _person, "name"),
        ("department", "VARCHAR", _pick(["Sales", "Legal", "Research", "Support", "Finance"]), "department"),
        ("salary", "INTEGER", _int(30000, 120000), "salary"),
        ("age", "INTEGER", _int(21, 65), "age"),
        ("city", "VARCHAR", _pick(CITIES), "city"),
    ]),
    ("player", "players", [
        ("player", "VARCHAR", _person, "player"),
        ("position", "VARCHAR", _pick(["guard", "forward", "center", "goalkeeper", "defender"]), "position"),
        ("team", "VARCHAR", _pick(["Eagles", "Tigers", "Rovers", "Comets", "Falcons"]), "team"),
        ("points", "INTEGER", _int(0, 900), "points"),
        ("year", "INTEGER", _int(1990, 2024), "year"),
    ]),
    ("episode", "episodes", [
        ("title", "VARCHAR", _pick(["Pilot", "The Return", "Lost Signal", "Homecoming", "Endgame",
                                    "First Light", "Crossroads", "Echoes"]), "title"),
        ("series_number", "INTEGER", _int(1, 120), "series number"),
        ("season_number", "INTEGER", _int(1, 24), "season number"),
        ("directed_by", "VARCHAR", _person, "director"),
        ("us_viewers", "REAL", _real(1.0, 25.0), "US viewers (millions)"),
    ]),
    ("city", "cities", [
        ("city", "VARCHAR", _pick(CITIES), "city"),
        ("country", "VARCHAR", _pick(COUNTRIES), "country"),
        ("population", "INTEGER", _int(50000, 9000000), "population"),
        ("area_km2", "REAL", _real(20.0, 3000.0), "area"),
        ("founded", "INTEGER", _int(800, 1950), "founding year"),
    ]),
    ("race", "races", [
        ("race_name", "VARCHAR", _pick(["Grand Prix", "Coastal Cup", "Mountain Classic", "City Sprint",
                                        "Desert Rally"]), "race name"),
        ("winner", "VARCHAR", _person, "winner"),
        ("laps", "INTEGER", _int(10, 80), "laps"),
        ("round", "INTEGER", _int(1, 20), "round"),
        ("circuit", "VARCHAR", _pick(CITIES), "circuit"),
    ]),
    ("album", "albums", [
        ("album", "VARCHAR", _pick(["Blue Hour", "Northern Lights", "Paper Moon", "Static", "Golden",
                                    "Wild Roads"]), "album"),
        ("artist", "VARCHAR", _person, "artist"),
        ("release_year", "INTEGER", _int(1965, 2024), "release year"),
        ("tracks", "INTEGER", _int(6, 22), "number of tracks"),
        ("label", "VARCHAR", _pick(["Atlas", "Harbor", "Nova", "Zenith"]), "label"),
    ]),
    ("school", "schools", [
        ("school", "VARCHAR", _pick(["Hillside", "Riverside", "Oakwood", "Lakeview", "Westfield"]), "school"),
        ("location", "VARCHAR", _pick(CITIES), "location"),
        ("enrollment", "INTEGER", _int(100, 5000), "enrollment"),
        ("founded", "INTEGER", _int(1850, 2015), "year founded"),
        ("mascot", "VARCHAR", _pick(["Bears", "Owls", "Wolves", "Hawks"]), "mascot"),
    ]),
]

AGGREGATES = [
    ("MAX", ["What is the highest {col} when {cond}?", "What is the largest {col} for {cond}?",
             "Name the maximum {col} where {cond}."]),
    ("MIN", ["What is the lowest {col} when {cond}?", "What is the smallest {col} where {cond}?",
             "Name the minimum {col} for {cond}."]),
    ("AVG", ["What is the average {col} when {cond}?", "What is the mean {col} for {cond}?"]),
    ("SUM", ["What is the total {col} when {cond}?", "What is the sum of {col} where {cond}?"]),
]

SELECT_PHRASES = [
    "What is the {col} when {cond}?",
    "What {col} has {cond}?",
    "Name the {col} for {cond}.",
    "Tell me the {col} where {cond}.",
    "Which {col} has {cond}?",
    "What is the {col} of the {noun} with {cond}?",
    "List the {col} when {cond}.",
]

COUNT_PHRASES = [
    "How many {plural} have {cond}?",
    "What is the number of {plural} with {cond}?",
    "Count the {plural} where {cond}.",
]


def _literal(value):
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(value)


def _condition(rng, column, sql_type, make, words, numeric_ops):
    """Return (SQL condition, English condition)."""
    value = make(rng)
    if sql_type != "VARCHAR" and numeric_ops and rng.random() < 0.35:
        op, phrase = rng.choice([(">", "greater than"), ("<", "less than")])
        return f"{column} {op} {_literal(value)}", f"{words} {phrase} {value}"
    english = rng.choice(["{w} of {v}", "{w} {v}", "a {w} of {v}", "{w} is {v}"])
    return f"{column} = {_literal(value)}", english.format(w=words, v=value)


def _conditions(rng, columns, exclude, numeric_ops=True):
    candidates = [c for c in columns if c[0] not in exclude]
    picked = rng.sample(candidates, 2 if rng.random() < 0.35 else 1)
    parts = [_condition(rng, *c, numeric_ops=numeric_ops) for c in picked]
    return " AND ".join(p[0] for p in parts), " and ".join(p[1] for p in parts)


def _row(rng, index):
    noun, plural, columns = rng.choice(THEMES)
    table = rng.choice([f"table_name_{rng.randint(1, 99)}", f"table_{rng.randint(10000, 99999)}_{rng.randint(1, 9)}"])
    context = f"CREATE TABLE {table} ({', '.join(f'{c[0]} {c[1]}' for c in columns)})"
    numeric = [c for c in columns if c[1] in ("INTEGER", "REAL")]
    kind = rng.choices(["select", "aggregate", "count", "order"], weights=[5, 3, 2, 1])[0]

    if kind == "select":
        target = rng.choice(columns)
        where_sql, where_en = _conditions(rng, columns, {target[0]})
        question = rng.choice(SELECT_PHRASES).format(col=target[3], cond=where_en, noun=noun)
        answer = f"SELECT {target[0]} FROM {table} WHERE {where_sql}"
    elif kind == "aggregate":
        target = rng.choice(numeric)
        func, phrases = rng.choice(AGGREGATES)
        where_sql, where_en = _conditions(rng, columns, {target[0]})
        question = rng.choice(phrases).format(col=target[3], cond=where_en)
        answer = f"SELECT {func}({target[0]}) FROM {table} WHERE {where_sql}"
    elif kind == "count":
        where_sql, where_en = _conditions(rng, columns, set())
        question = rng.choice(COUNT_PHRASES).format(plural=plural, cond=where_en)
        answer = f"SELECT COUNT(*) FROM {table} WHERE {where_sql}"
    else:
        key = rng.choice(numeric)
        subject = columns[0]
        descending = rng.random() < 0.5
        limit = rng.choice([1, 1, 3, 5])
        extreme = "highest" if descending else "lowest"
        if limit == 1:
            question = f"Which {subject[3]} has the {extreme} {key[3]}?"
        else:
            question = f"List the {subject[3]} of the {limit} {plural} with the {extreme} {key[3]}."
        answer = (f"SELECT {subject[0]} FROM {table} ORDER BY {key[0]}"
                  f"{' DESC' if descending else ''} LIMIT {limit}")
    return {"question": question, "context": context, "answer": answer}


def generate(n, seed=0):
    """Return `n` rows {question, context, answer}; deterministic for a seed."""
    rng = random.Random(f"tunelab-builtin-sql-{seed}")
    return [_row(rng, i) for i in range(n)]
