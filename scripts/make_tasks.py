"""Generate the two tasks of the main job (``lorakit demo``) with a fixed seed.

    python scripts/make_tasks.py            # writes lorakit/demos/data/{sql,json}/{train,test}.jsonl
    python scripts/make_tasks.py --check    # regenerates in memory and fails if the files differ

Both tasks are chat records ({"messages": [system, user, assistant]}), trained with the
loss on the assistant turn only:

* ``sql``: an English question about two small tables -> one query in a fixed SQL
  dialect (upper-case keywords, single quotes, no trailing semicolon), 12 query shapes,
  2-3 phrasings each;
* ``json``: a sentence about a person -> ``{"name":...,"age":...,"job":...,"city":...}``,
  compact (no spaces), keys in that order, 8 sentence shapes.

Every test question is new: no test user message appears in the training file (the test
set is drawn first, then training examples are drawn and kept only when unseen).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240605
N_TRAIN, N_TEST = 3000, 200
DATA = Path(__file__).resolve().parent.parent / "lorakit" / "demos" / "data"

SQL_SYSTEM = "Write SQL. Tables: employees(name, dept, city, age, salary), orders(customer, product, amount, year)."
JSON_SYSTEM = "Extract name, age, job and city as compact JSON."

DEPTS = ["Sales", "Marketing", "Finance", "Engineering", "Support", "Legal", "Research", "Operations", "Design",
         "Security", "Logistics", "Training"]
CITIES = ["Berlin", "Paris", "Madrid", "Rome", "Vienna", "Lisbon", "Oslo", "Dublin", "Prague", "Warsaw", "Athens",
          "Zurich", "Munich", "Milan", "Porto", "Krakow", "Lyon", "Ghent", "Turin", "Bergen"]
CUSTOMERS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka", "Tyrell", "Cyberdyne",
             "Soylent", "Vandelay", "Oscorp", "Aperture", "Pied Piper", "Dunder Mifflin"]
PRODUCTS = ["laptops", "phones", "chairs", "desks", "printers", "monitors", "tablets", "cables", "lamps", "routers"]
FIRST = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
         "Maya", "Nils", "Olga", "Pablo", "Rosa", "Sven", "Tara", "Omar", "Lena", "Ivan", "Noor", "Emil"]
LAST = ["Schmidt", "Lopez", "Rossi", "Novak", "Berg", "Costa", "Meyer", "Dubois", "Kowalski", "Larsen",
        "Moreau", "Weber", "Silva", "Horvat", "Jensen", "Fischer"]
JOBS = ["nurse", "teacher", "pilot", "chef", "lawyer", "baker", "architect", "engineer", "designer", "farmer",
        "dentist", "plumber", "editor", "pharmacist"]


def sql_example(r: random.Random) -> tuple[str, str]:
    """One (question, query) pair: a random shape, phrasing and slot values."""
    d, c, cu = r.choice(DEPTS), r.choice(CITIES), r.choice(CUSTOMERS)
    n, k, y, p = r.randrange(21, 65), r.randrange(2, 10), r.randrange(2015, 2025), r.choice(PRODUCTS)
    lo = r.randrange(30, 80) * 1000
    hi, amt = lo + r.randrange(5, 40) * 1000, r.randrange(1, 50) * 100
    shapes = [
        (["How many {d} employees are in {c}?", "Count the {d} staff based in {c}.",
          "Number of people in {d} working in {c}?"],
         "SELECT COUNT(*) FROM employees WHERE dept = '{d}' AND city = '{c}'"),
        (["List the employees in {c} older than {n}.", "Who works in {c} and is over {n}?",
          "Names of staff in {c} aged above {n}."], "SELECT name FROM employees WHERE city = '{c}' AND age > {n}"),
        (["What is the average salary of {d} staff in {c}?", "Average pay of the {d} team in {c}?"],
         "SELECT AVG(salary) FROM employees WHERE dept = '{d}' AND city = '{c}'"),
        (["Show the {k} best paid employees in {d}.", "Top {k} earners in {d}, names only."],
         "SELECT name FROM employees WHERE dept = '{d}' ORDER BY salary DESC LIMIT {k}"),
        (["Highest salary in {c} for staff older than {n}?", "What is the top salary in {c} among people over {n}?"],
         "SELECT MAX(salary) FROM employees WHERE city = '{c}' AND age > {n}"),
        (["Who earns between {lo} and {hi}?", "Employees with a salary from {lo} to {hi}."],
         "SELECT name FROM employees WHERE salary BETWEEN {lo} AND {hi}"),
        (["Which employees in {d} are younger than {n}?", "{d} staff under {n} years old?"],
         "SELECT name FROM employees WHERE dept = '{d}' AND age < {n}"),
        (["Sort the {d} employees in {c} by age, oldest first.", "List {d} people in {c} from oldest to youngest."],
         "SELECT name FROM employees WHERE dept = '{d}' AND city = '{c}' ORDER BY age DESC"),
        (["Total amount ordered by {cu} in {y}?", "How much did {cu} spend in {y}?"],
         "SELECT SUM(amount) FROM orders WHERE customer = '{cu}' AND year = {y}"),
        (["Which products did {cu} order in {y}?", "List the products bought by {cu} in {y}."],
         "SELECT DISTINCT product FROM orders WHERE customer = '{cu}' AND year = {y}"),
        (["How many orders over {amt} were placed in {y}?", "Count {y} orders above {amt}."],
         "SELECT COUNT(*) FROM orders WHERE amount > {amt} AND year = {y}"),
        (["Who bought {p} in {y}?", "Customers that ordered {p} in {y}?"],
         "SELECT customer FROM orders WHERE product = '{p}' AND year = {y}"),
    ]
    questions, query = r.choice(shapes)
    slots = dict(d=d, c=c, cu=cu, n=n, k=k, y=y, p=p, lo=lo, hi=hi, amt=amt)
    return r.choice(questions).format(**slots), query.format(**slots)


def json_example(r: random.Random) -> tuple[str, str]:
    """One (sentence, compact JSON) pair about a made-up person."""
    name, age, job, city = f"{r.choice(FIRST)} {r.choice(LAST)}", r.randrange(19, 80), r.choice(JOBS), r.choice(CITIES)
    a = "an" if job[0] in "aeiou" else "a"
    shapes = [
        "{name} is {age} and works as {a} {job} in {city}.",
        "{city}-based {job} {name}, {age}.",
        "Name: {name}; age {age}; {job} from {city}",
        "{age}-year-old {name} works in {city} as {a} {job}.",
        "Meet {name}, {a} {job} living in {city}, aged {age}.",
        "In {city}, {name} ({age}) has a job as {a} {job}.",
        "{name}, {job}, {city}, {age} years old",
        "The {job} {name} moved to {city} at the age of {age}.",
    ]
    text = r.choice(shapes).format(name=name, age=age, job=job, city=city, a=a)
    answer = json.dumps({"name": name, "age": age, "job": job, "city": city}, separators=(",", ":"))
    return text, answer


def record(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def make_task(make, system: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, test): the test set first, then training examples whose question is not in it."""
    r = random.Random(seed)
    test, seen = [], set()
    while len(test) < N_TEST:
        q, a = make(r)
        if q not in seen:
            seen.add(q)
            test.append(record(system, q, a))
    train = []
    while len(train) < N_TRAIN:
        q, a = make(r)
        if q not in seen:
            seen.add(q)
            train.append(record(system, q, a))
    return train, test


def build() -> dict[str, str]:
    """{relative path: file content} for every data file."""
    files = {}
    for i, (task, make, system) in enumerate([("sql", sql_example, SQL_SYSTEM), ("json", json_example, JSON_SYSTEM)]):
        train, test = make_task(make, system, SEED + i)
        for split, rows in (("train", train), ("test", test)):
            files[f"{task}/{split}.jsonl"] = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DATA), help="output folder (default: lorakit/demos/data)")
    ap.add_argument("--check", action="store_true", help="fail when the files on disk differ from a fresh build")
    args = ap.parse_args(argv)
    out = Path(args.out)
    files = build()
    if args.check:
        stale = [p for p, text in files.items() if not (out / p).is_file() or (out / p).read_text() != text]
        if stale:
            print(f"out of date: {stale}; run python scripts/make_tasks.py", file=sys.stderr)
            return 1
        print("data files are up to date")
        return 0
    for p, text in files.items():
        (out / p).parent.mkdir(parents=True, exist_ok=True)
        (out / p).write_text(text, encoding="utf-8")
        print(f"wrote {out / p} ({text.count(chr(10))} examples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
