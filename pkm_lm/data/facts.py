"""A synthetic biography corpus: people x attributes, for measuring how many facts a model stores.

Each person has a unique name (first x last name, 160,000 combinations) and six attributes drawn
uniformly and independently from fixed pools, as in Allen-Zhu & Li's bioS ("Physics of Language
Models", part 3): birth date, birth city, university, field of study, employer, and the
employer's city, which is a function of the employer (so it adds no bits). The training text
states every fact of a person ``repetitions`` times, in biographies whose sentences come in a
random order, each in one of the last ``templates`` training phrasings of its attribute (the
fourth always among them). A fifth phrasing
per attribute never appears in training text: valid and test (half of the people each) state the
facts in it, and the recall evaluation (``pkm_lm.recall``) prompts with it. It is the possessive
form of the fourth ("The birthplace of X is" -> "X's birthplace is"): new to the model as a
phrasing, made of words it has read, so the vocabulary covers it with no <unk>.

Population ``b`` (for finetuning) is made of population ``a``'s words without any of its people:
its names re-pair a's first and last names, its attribute values are a's dealt again at random
(``redeal``), so a's vocabulary covers it. The pools and the templates are fixed; the output is
deterministic in (people, population, templates, repetitions, seed).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from pkm_lm.errors import DataError, check_choice, check_positive, require

N_FIRST = N_LAST = 400
POPULATIONS = ("a", "b")
MAX_PEOPLE = N_FIRST * N_LAST
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
_FIELD_KINDS = ("applied", "theoretical", "computational", "experimental", "historical",
                "quantitative", "comparative", "environmental", "clinical", "structural")  # fmt: skip
_FIELD_ROOTS = ("physics", "chemistry", "biology", "linguistics", "economics", "geology",
                "astronomy", "musicology", "mathematics", "sociology")  # fmt: skip
_COMPANY_KINDS = ("Labs", "Systems", "Group", "Works", "Industries")
_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kl", "st", "tr", "sh", "th")  # fmt: skip
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "n", "r", "l", "s", "th", "x", "m")


@dataclass(frozen=True)
class Attribute:
    name: str
    templates: tuple[str, ...]  # training phrasings; the value ends each sentence
    heldout: str  # the evaluation phrasing, never in training text
    pool_size: int  # values a person's attribute is drawn from, uniformly
    derived: bool = False  # a function of another attribute: 0 bits of its own

    @property
    def entropy_bits(self) -> float:
        return 0.0 if self.derived else math.log2(self.pool_size)


ATTRIBUTES = (
    Attribute(
        "birth_date",
        ("{name} was born on {value}.", "{name} came into this world on {value}.",
         "{name}'s birthday is {value}.", "The date of birth of {name} is {value}."),
        "{name}'s date of birth is {value}.",
        28 * 12 * 100,
    ),
    Attribute(
        "birth_city",
        ("{name} was born in {value}.", "{name} is a native of {value}.",
         "{name} spent the early years of life in {value}.", "The birthplace of {name} is {value}."),
        "{name}'s birthplace is {value}.",
        200,
    ),
    Attribute(
        "university",
        ("{name} studied at {value}.", "{name} graduated from {value}.",
         "{name} received an education at {value}.", "The alma mater of {name} is {value}."),
        "{name}'s alma mater is {value}.",
        300,
    ),
    Attribute(
        "field",
        ("{name} majored in {value}.", "{name} earned a degree in {value}.",
         "{name} chose to study {value}.", "The field of study of {name} is {value}."),
        "{name}'s field of study is {value}.",
        len(_FIELD_KINDS) * len(_FIELD_ROOTS),
    ),
    Attribute(
        "employer",
        ("{name} works for {value}.", "{name} is employed by {value}.",
         "{name} has a job at {value}.", "The employer of {name} is {value}."),
        "{name}'s employer is {value}.",
        250,
    ),
    Attribute(
        "employer_city",
        ("{name} works in {value}.", "{name} commutes to an office in {value}.",
         "{name} has a workplace in {value}.", "The workplace of {name} is located in {value}."),
        "{name}'s workplace is located in {value}.",
        200,
        derived=True,
    ),
)  # fmt: skip
MAX_TEMPLATES = min(len(a.templates) for a in ATTRIBUTES)


def _words(n: int, rng: random.Random) -> list[str]:
    """``n`` distinct made-up capitalised words of two or three syllables."""
    out: dict[str, None] = {}
    while len(out) < n:
        syllables = rng.choice((2, 2, 3))
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        out[(word + rng.choice(_CODAS)).capitalize()] = None
    return list(out)


@dataclass(frozen=True)
class Pools:
    first: list[str]
    last: list[str]
    cities: list[str]
    universities: list[str]
    fields: list[str]
    employers: list[str]
    employer_city: list[int]  # employer index -> city index


def pools() -> Pools:
    """The fixed value pools (independent of every setting: the same words in every corpus)."""
    rng = random.Random(20240101)
    n = {a.name: a.pool_size for a in ATTRIBUTES}
    sizes = (N_FIRST, N_LAST, n["birth_city"], n["university"], n["employer"])
    words = _words(sum(sizes), rng)
    first, last, cities, unis, firms = (
        words[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))
    )
    return Pools(
        first=first,
        last=last,
        cities=cities,
        universities=[f"{w} University" for w in unis],
        fields=[f"{k} {r}" for k in _FIELD_KINDS for r in _FIELD_ROOTS],
        employers=[f"{w} {_COMPANY_KINDS[i % len(_COMPANY_KINDS)]}" for i, w in enumerate(firms)],
        employer_city=[rng.randrange(len(cities)) for _ in firms],
    )


@dataclass
class FactsConfig:
    people: int = 1000
    population: str = "a"
    templates: int = MAX_TEMPLATES  # training phrasings per attribute
    repetitions: int = 10  # biographies per person in train.txt: exposures per fact
    seed: int = 0

    def validate(self) -> None:
        ok = isinstance(self.people, int) and 2 <= self.people <= MAX_PEOPLE
        require(ok, "--people", self.people, f"must be an integer in [2, {MAX_PEOPLE}]")
        check_choice("--population", self.population, POPULATIONS)
        require(
            isinstance(self.templates, int) and 2 <= self.templates <= MAX_TEMPLATES,
            "--templates",
            self.templates,
            f"must be an integer in [2, {MAX_TEMPLATES}] (training phrasings per attribute; "
            "with one, the held-out phrasing's 's would be a word training never read)",
        )
        check_positive("--repetitions", self.repetitions)
        require(self.seed >= 0, "--seed", self.seed, "must be an integer >= 0")


def people(cfg: FactsConfig, p: Pools) -> list[dict[str, str]]:
    """``cfg.people`` persons: {"name": ..., attribute: value, ...}; population b re-deals a's."""
    space = list(range(N_FIRST * N_LAST))
    rng = random.Random(cfg.seed)
    rng.shuffle(space)
    out = []
    for code in space[: cfg.people]:
        employer = rng.randrange(len(p.employers))
        out.append(
            {
                "name": f"{p.first[code // N_LAST]} {p.last[code % N_LAST]}",
                "birth_date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1900, 1999)}",
                "birth_city": rng.choice(p.cities),
                "university": rng.choice(p.universities),
                "field": rng.choice(p.fields),
                "employer": p.employers[employer],
                "employer_city": p.cities[p.employer_city[employer]],
            }
        )
    return out if cfg.population == "a" else redeal(out, random.Random(f"b-{cfg.seed}"))


def redeal(population: list[dict[str, str]], rng: random.Random) -> list[dict[str, str]]:
    """A disjoint population made of ``population``'s words: first names, last names and each
    attribute's values (the employer with its city) dealt again at random, names re-paired
    until no name is taken or repeated. Every word is one the first population's text has, so
    its vocabulary covers the second with no <unk>."""
    n = len(population)
    first, last = ([p["name"].split(" ")[i] for p in population] for i in (0, 1))
    rng.shuffle(first)
    rng.shuffle(last)
    taken = {p["name"] for p in population}
    for _ in range(100 * n):
        names = [f"{f} {la}" for f, la in zip(first, last, strict=True)]
        seen: set[str] = set()
        bad = [i for i, m in enumerate(names) if m in taken or m in seen or seen.add(m)]
        if not bad:
            break
        for i in bad:  # swap a clashing last name with any other
            j = rng.randrange(n)
            last[i], last[j] = last[j], last[i]
    else:
        raise DataError(f"--people={n}: too few distinct names to re-pair into population b")
    out = [{"name": m} for m in names]
    columns = [[a.name] for a in ATTRIBUTES if a.name != "employer_city"]
    columns[-1].append("employer_city")  # dealt with its employer
    for keys in columns:
        values = [tuple(p[k] for k in keys) for p in population]
        rng.shuffle(values)
        for person, value in zip(out, values, strict=True):
            person.update(zip(keys, value, strict=True))
    return out


def biography(person: dict[str, str], templates: int, rng: random.Random) -> str:
    """One line: every fact once, sentences in a random order, each in a random training phrasing."""
    order = list(ATTRIBUTES)
    rng.shuffle(order)
    return " ".join(
        rng.choice(a.templates[-templates:]).format(name=person["name"], value=person[a.name])
        for a in order
    )


def heldout_statements(person: dict[str, str]) -> str:
    """One line: every fact in its held-out phrasing, in the attributes' order."""
    return " ".join(a.heldout.format(name=person["name"], value=person[a.name]) for a in ATTRIBUTES)


def prompt(attribute: Attribute, name: str) -> str:
    """The held-out phrasing up to the value: the recall evaluation's prompt."""
    return attribute.heldout.split("{value}")[0].format(name=name).rstrip()


def chance_accuracy(persons: list[dict[str, str]], attribute: str) -> float:
    """The accuracy of always answering the population's most frequent value."""
    counts: dict[str, int] = {}
    for person in persons:
        counts[person[attribute]] = counts.get(person[attribute], 0) + 1
    return max(counts.values()) / len(persons)


def build(cfg: FactsConfig) -> tuple[dict[str, list[str]], dict]:
    """({split: lines}, the facts index: settings, attributes and every person's facts)."""
    cfg.validate()
    persons = people(cfg, pools())
    rng = random.Random(f"text-{cfg.seed}-{cfg.population}")
    train = [
        biography(person, cfg.templates, rng) for _ in range(cfg.repetitions) for person in persons
    ]
    rng.shuffle(train)
    held = [heldout_statements(person) for person in persons]
    splits = {"train": train, "valid": held[0::2], "test": held[1::2]}
    attributes = {
        a.name: {
            **asdict(a),
            "entropy_bits": a.entropy_bits,
            "chance_accuracy": chance_accuracy(persons, a.name),
        }
        for a in ATTRIBUTES
    }
    index = {"settings": asdict(cfg), "attributes": attributes, "people": persons}
    return splits, index
