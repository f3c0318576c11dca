"""Seeded generators for the GLUE-like text tasks of the embedded GPT-2 benchmark.

Everything here is pure Python on a ``random.Random`` passed in (no global random state, no
downloads), so the same seed always gives the same data. Every task draws from one shared toy
English (``LEXICON`` and ``Scene``): the experts then specialise one backbone on overlapping
vocabulary, which is what makes merging them interfere, as it does for GLUE.

Tasks, named after the GLUE task they imitate (labels in GLUE's order):

- ``cola_like``: acceptability; unacceptable (0, the sentence with an agreement, determiner,
  word-order or missing-word error) / acceptable (1).
- ``sst2_like``: sentiment of a short review built from a polarity lexicon, with negation and
  "but" clauses (the clause after "but" decides, as in SST-2): negative (0) / positive (1).
- ``rte_like``: does the first sentence entail the second (details dropped, subject generalised)?
  entailment (0) / not entailment (1: negated, wrong kind of subject, or an unsupported detail).
- ``mnli_like``: entailment (0, details dropped) / neutral (1, adds a place or time the premise
  does not give) / contradiction (2, negated).
- ``qnli_like``: does the sentence say what the question (where/when/how) asks?
  entailment (0) / not entailment (1: it gives another detail instead).

Paraphrase (MRPC-like: same event in synonyms vs. a different event) was tried and left out: a
model of this size does not learn to compare two sentences word by word from a few thousand
pairs in the build's budget, so that expert would not beat the pretrained model.

Sentence pairs are joined with ``SEPARATOR``, a token the tokenizer learns from the corpus.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SEPARATOR = " |"
"""Joins the two sentences of a pair; byte-level BPE learns it as one token (``Ġ|``)."""

# ---------------------------------------------------------------------------------------------
# The toy language. A *meaning* is a tuple of interchangeable surface forms (synonyms): a noun
# form is (singular, plural), a verb form is (third person singular, base form).
# ---------------------------------------------------------------------------------------------

Meaning = tuple

PEOPLE: Tuple[Meaning, ...] = (
    (("child", "children"), ("kid", "kids")),
    (("man", "men"), ("guy", "guys")),
    (("woman", "women"), ("lady", "ladies")),
    (("doctor", "doctors"), ("physician", "physicians")),
    (("teacher", "teachers"), ("tutor", "tutors")),
    (("student", "students"), ("pupil", "pupils")),
    (("farmer", "farmers"),),
    (("baker", "bakers"),),
)
ANIMALS: Tuple[Meaning, ...] = (
    (("dog", "dogs"), ("hound", "hounds")),
    (("cat", "cats"),),
    (("bird", "birds"),),
    (("horse", "horses"),),
    (("rabbit", "rabbits"), ("bunny", "bunnies")),
    (("cow", "cows"),),
    (("duck", "ducks"),),
)
OBJECTS: Tuple[Meaning, ...] = (
    (("ball", "balls"),),
    (("book", "books"),),
    (("car", "cars"), ("automobile", "automobiles")),
    (("bag", "bags"), ("sack", "sacks")),
    (("box", "boxes"), ("crate", "crates")),
    (("letter", "letters"),),
    (("apple", "apples"),),
    (("cup", "cups"), ("mug", "mugs")),
    (("gift", "gifts"), ("present", "presents")),
    (("hat", "hats"), ("cap", "caps")),
)
HYPERNYMS = {"person": ("person", "people"), "animal": ("animal", "animals")}
SUBJECTS = {"person": PEOPLE, "animal": ANIMALS}

INTRANSITIVE: Tuple[Meaning, ...] = (
    (("runs", "run"), ("races", "race")),
    (("sleeps", "sleep"), ("naps", "nap")),
    (("walks", "walk"), ("strolls", "stroll")),
    (("shouts", "shout"), ("yells", "yell")),
    (("talks", "talk"), ("speaks", "speak")),
    (("waits", "wait"),),
    (("sings", "sing"),),
    (("eats", "eat"), ("dines", "dine")),
    (("leaves", "leave"), ("departs", "depart")),
    (("laughs", "laugh"),),
)
TRANSITIVE: Tuple[Meaning, ...] = (
    (("sees", "see"), ("notices", "notice")),
    (("likes", "like"), ("enjoys", "enjoy")),
    (("finds", "find"), ("discovers", "discover")),
    (("carries", "carry"),),
    (("buys", "buy"), ("purchases", "purchase")),
    (("throws", "throw"), ("tosses", "toss")),
    (("wants", "want"),),
    (("watches", "watch"),),
    (("drops", "drop"),),
    (("opens", "open"),),
)
ADJECTIVES: Tuple[Meaning, ...] = (
    ("big", "large"), ("small", "little"), ("happy", "glad"), ("quick", "fast"),
    ("quiet", "silent"), ("tired", "sleepy"), ("clever", "smart"), ("young",), ("brown",),
    ("angry", "mad"),
)
ADVERBS: Tuple[Meaning, ...] = (
    ("quickly", "rapidly"), ("slowly",), ("quietly", "silently"), ("often", "frequently"),
    ("happily", "gladly"), ("loudly", "noisily"), ("carefully",),
)
PLACES: Tuple[Meaning, ...] = (
    ("park",), ("garden", "yard"), ("kitchen",), ("city", "town"), ("school",),
    ("shop", "store"), ("forest", "woods"), ("house",), ("street", "road"),
    ("field", "meadow"),
)
TIMES: Tuple[Meaning, ...] = (
    ("in the morning",), ("in the evening",), ("at night",), ("at noon", "at midday"),
    ("on sunday",), ("on monday",), ("every day", "daily"), ("in winter",), ("in summer",),
)

SINGULAR_DETERMINERS = ("the", "a", "every", "one")
PLURAL_DETERMINERS = ("the", "some", "two", "many")

# Sentiment lexicon (sst2_like): things one reviews, and adjectives of each polarity.
REVIEWED = ("movie", "film", "story", "plot", "ending", "acting", "music", "book", "show",
            "meal", "song", "cast", "script", "dinner", "hotel", "service")
POSITIVE = ("good", "great", "wonderful", "lovely", "excellent", "brilliant", "delightful",
            "charming", "fun", "beautiful", "moving", "superb", "enjoyable", "pleasant", "perfect")
NEGATIVE = ("bad", "awful", "terrible", "boring", "dull", "poor", "weak", "silly", "tedious",
            "messy", "bland", "painful", "horrible", "clumsy", "ugly")
INTENSIFIERS = ("", "very ", "really ", "quite ", "so ", "truly ")
REVIEW_OPENERS = ("", "i think ", "honestly ", "we felt ", "overall ", "my friend said ")


@dataclass(frozen=True)
class Scene:
    """Who does what, where and when: the meaning behind a sentence (values are meanings)."""

    kind: str  # "person" or "animal": what the subject's hypernym is
    subject: Meaning
    plural: bool
    determiner: str
    verb: Meaning
    adjective: Optional[Meaning] = None
    obj: Optional[Meaning] = None  # set iff the verb is transitive
    adverb: Optional[Meaning] = None
    place: Optional[Meaning] = None
    time: Optional[Meaning] = None


def random_scene(rng: random.Random, modifier_probability: float = 0.5) -> Scene:
    kind = rng.choice(("person", "animal"))
    plural = rng.random() < 0.4
    transitive = rng.random() < 0.5

    def maybe(options):
        return rng.choice(options) if rng.random() < modifier_probability else None

    return Scene(
        kind=kind,
        subject=rng.choice(SUBJECTS[kind]),
        plural=plural,
        determiner=rng.choice(PLURAL_DETERMINERS if plural else SINGULAR_DETERMINERS),
        verb=rng.choice(TRANSITIVE if transitive else INTRANSITIVE),
        adjective=maybe(ADJECTIVES),
        obj=rng.choice(OBJECTS) if transitive else None,
        adverb=maybe(ADVERBS),
        place=maybe(PLACES),
        time=maybe(TIMES),
    )


def _article(determiner: str, next_word: str) -> str:
    return "an" if determiner == "a" and next_word[0] in "aeiou" else determiner


# A sentence is built as (word, role) pairs so that acceptability errors can target roles.
Tagged = List[Tuple[str, str]]


def subject_phrase(scene: Scene, rng: random.Random, *, hypernym: bool = False) -> Tagged:
    noun_forms = HYPERNYMS[scene.kind] if hypernym else rng.choice(scene.subject)
    noun = noun_forms[1 if scene.plural else 0]
    words: Tagged = []
    if scene.adjective is not None and not hypernym:
        words.append((rng.choice(scene.adjective), "adj"))
    words.append((noun, "noun"))
    return [(_article(scene.determiner, words[0][0]), "det"), *words]


def modifier_phrases(scene: Scene, rng: random.Random) -> List[Tagged]:
    """The scene's place and time phrases (whichever it has), in random order."""
    phrases: List[Tagged] = []
    if scene.place is not None:
        phrases.append([("in", "prep"), ("the", "pdet"), (rng.choice(scene.place), "place")])
    if scene.time is not None:
        phrases.append([(rng.choice(scene.time), "time")])
    rng.shuffle(phrases)
    return phrases


def tagged_sentence(scene: Scene, rng: random.Random, *, front_modifier: bool = False,
                    wrong_agreement: bool = False) -> Tagged:
    """A declarative sentence for ``scene``; synonyms are drawn at random for each content word."""
    plural = scene.plural != wrong_agreement
    words = subject_phrase(scene, rng)
    words.append((rng.choice(scene.verb)[1 if plural else 0], "verb"))
    if scene.obj is not None:
        obj = rng.choice(scene.obj)[0]
        words += [(_article(rng.choice(("the", "a")), obj), "odet"), (obj, "obj")]
    if scene.adverb is not None:
        words.append((rng.choice(scene.adverb), "adv"))
    phrases = modifier_phrases(scene, rng)
    if front_modifier and phrases:
        return [*phrases[0], *words, *[w for p in phrases[1:] for w in p]]
    return [*words, *[w for p in phrases for w in p]]


def words_of(tagged: Tagged) -> str:
    return " ".join(word for word, _ in tagged)


def sentence(scene: Scene, rng: random.Random, *, front_modifier: bool = False) -> str:
    return words_of(tagged_sentence(scene, rng, front_modifier=front_modifier))


def negated_sentence(scene: Scene, rng: random.Random, *, hypernym: bool = False) -> str:
    """``the dog does not run ...``: contradicts ``scene``."""
    words = subject_phrase(scene, rng, hypernym=hypernym)
    auxiliary = "do not" if scene.plural else "does not"
    words.append((f"{auxiliary} {rng.choice(scene.verb)[1]}", "verb"))
    if scene.obj is not None:
        words += [("the", "odet"), (rng.choice(scene.obj)[0], "obj")]
    return words_of(words)


def join_pair(first: str, second: str) -> str:
    return f"{first}{SEPARATOR} {second}"


def different(rng: random.Random, options: Sequence, current) -> object:
    return rng.choice([option for option in options if option != current])


def change_one_meaning(scene: Scene, rng: random.Random, fields: Sequence[str]) -> Scene:
    """``scene`` with one of ``fields`` (those it has) set to a different meaning."""
    pools = {
        "subject": SUBJECTS[scene.kind], "verb": TRANSITIVE if scene.obj else INTRANSITIVE,
        "obj": OBJECTS, "adjective": ADJECTIVES, "adverb": ADVERBS, "place": PLACES,
        "time": TIMES,
    }
    present = [f for f in fields if getattr(scene, f) is not None]
    field = rng.choice(present)
    return replace(scene, **{field: different(rng, pools[field], getattr(scene, field))})


# ---------------------------------------------------------------------------------------------
# cola_like: acceptable (1) vs unacceptable (0)
# ---------------------------------------------------------------------------------------------

# Adjacent role pairs whose swap is always ungrammatical in this grammar.
UNSWAPPABLE_ORDER = {("det", "noun"), ("det", "adj"), ("adj", "noun"), ("noun", "verb"),
                     ("verb", "odet"), ("odet", "obj"), ("prep", "pdet"), ("pdet", "place")}


def _swap_adjacent(words: Tagged, rng: random.Random) -> Tagged:
    spots = [i for i in range(len(words) - 1)
             if (words[i][1], words[i + 1][1]) in UNSWAPPABLE_ORDER]
    i = rng.choice(spots)
    return [*words[:i], words[i + 1], words[i], *words[i + 2:]]


def _drop_word(words: Tagged, rng: random.Random) -> Tagged:
    # Dropping the verb or the determiner of a singular noun is never grammatical (dropping the
    # subject noun can be: "many wait", "one sleeps").
    droppable = {"verb", "odet", "pdet"}
    spots = [i for i, (_, role) in enumerate(words) if role in droppable]
    i = rng.choice(spots)
    return words[:i] + words[i + 1:]


def _wrong_determiner(scene: Scene, rng: random.Random) -> Scene:
    # "two dog" / "a dogs"; "the" fits both numbers and "some dog" is English, so neither is used
    wrong = ("a", "every", "one") if scene.plural else ("two", "many")
    return replace(scene, determiner=rng.choice(wrong))


def cola_like(rng: random.Random, label: int) -> str:
    scene = random_scene(rng)
    front = rng.random() < 0.2  # for both labels, so a fronted phrase is no cue
    if label == 1:
        return sentence(scene, rng, front_modifier=front)
    error = rng.choice(("agreement", "determiner", "order", "missing"))
    if error == "agreement":
        return words_of(tagged_sentence(scene, rng, front_modifier=front, wrong_agreement=True))
    if error == "determiner":
        return sentence(_wrong_determiner(scene, rng), rng, front_modifier=front)
    words = tagged_sentence(scene, rng, front_modifier=front)
    return words_of(_swap_adjacent(words, rng) if error == "order" else _drop_word(words, rng))


# ---------------------------------------------------------------------------------------------
# sst2_like: negative (0) vs positive (1)
# ---------------------------------------------------------------------------------------------


def _polar(rng: random.Random, positive: bool) -> str:
    return rng.choice(POSITIVE if positive else NEGATIVE)


def sst2_like(rng: random.Random, label: int) -> str:
    positive = label == 1
    thing, other = rng.sample(REVIEWED, 2)
    opener = rng.choice(REVIEW_OPENERS)
    form = rng.choice(("plain", "plain", "negated", "but", "and", "exclaim"))
    if form == "plain":
        review = f"the {thing} was {rng.choice(INTENSIFIERS)}{_polar(rng, positive)}"
    elif form == "negated":  # "not bad" is positive
        review = f"the {thing} was not {_polar(rng, not positive)}"
    elif form == "but":  # the clause after "but" decides
        review = (f"the {thing} was {_polar(rng, not positive)} but the {other} was "
                  f"{rng.choice(INTENSIFIERS)}{_polar(rng, positive)}")
    elif form == "and":
        review = (f"the {thing} was {_polar(rng, positive)} and the {other} was "
                  f"{_polar(rng, positive)}")
    else:
        adjective = _polar(rng, positive)
        review = f"what {_article('a', adjective)} {adjective} {thing}"
    if rng.random() < 0.3:  # a neutral clause around it, in the shared vocabulary
        return f"{sentence(random_scene(rng, 0.3), rng)} and {review}"
    return opener + review


# ---------------------------------------------------------------------------------------------
# rte_like: entailment (0) vs not entailment (1)
# ---------------------------------------------------------------------------------------------


def entailed_by(scene: Scene, rng: random.Random) -> Scene:
    """A less specific scene that ``scene`` implies: some modifiers dropped."""
    kept = {f: getattr(scene, f) if rng.random() < 0.35 else None
            for f in ("adjective", "adverb", "place", "time")}
    return replace(scene, **kept)


def rte_like(rng: random.Random, label: int) -> str:
    premise = random_scene(rng, modifier_probability=0.6)
    if premise.determiner == "every":  # "every big dog" does not entail "every dog"
        premise = replace(premise, determiner="the")
    hypothesis = entailed_by(premise, rng)
    hypernym = rng.random() < 0.3
    if hypernym:  # "the animal" would need the premise's referent; "an animal" is always implied
        hypothesis = replace(hypothesis, determiner="some" if hypothesis.plural else "a")
    if label == 0:
        claim = words_of(_hypothesis_words(hypothesis, rng, hypernym))
        return join_pair(sentence(premise, rng), claim)
    error = rng.choice(("negated", "wrong_kind", "added"))
    if error == "negated":
        claim = negated_sentence(hypothesis, rng, hypernym=hypernym)
    elif error == "wrong_kind":  # "a person runs" when an animal did
        wrong = "animal" if hypothesis.kind == "person" else "person"
        claim = words_of(_hypothesis_words(replace(hypothesis, kind=wrong), rng, hypernym=True))
    else:  # a detail the premise does not give
        missing = [f for f in ("place", "time") if getattr(premise, f) is None]
        if not missing:
            premise = replace(premise, time=None)
            hypothesis = replace(hypothesis, time=None)
            missing = ["time"]
        field = rng.choice(missing)
        pool = PLACES if field == "place" else TIMES
        claim = words_of(_hypothesis_words(replace(hypothesis, **{field: rng.choice(pool)}),
                                           rng, hypernym))
    return join_pair(sentence(premise, rng), claim)


def _hypothesis_words(scene: Scene, rng: random.Random, hypernym: bool) -> Tagged:
    if hypernym:  # "an animal runs": the adjective goes with the specific noun
        words = subject_phrase(replace(scene, adjective=None), rng, hypernym=True)
        rest = tagged_sentence(replace(scene, adjective=None), rng)[2:]
        return [*words, *rest]
    return tagged_sentence(scene, rng)


# ---------------------------------------------------------------------------------------------
# mnli_like: entailment (0) / neutral (1) / contradiction (2), GLUE's MNLI label order
# ---------------------------------------------------------------------------------------------


def mnli_like(rng: random.Random, label: int) -> str:
    premise = random_scene(rng, modifier_probability=0.6)
    if premise.determiner == "every":
        premise = replace(premise, determiner="the")
    hypothesis = entailed_by(premise, rng)
    if label == 0:
        claim = sentence(hypothesis, rng)
    elif label == 1:  # adds a place or time the premise does not give: may or may not hold
        missing = [f for f in ("place", "time") if getattr(premise, f) is None]
        if not missing:
            premise = replace(premise, time=None)
            hypothesis = replace(hypothesis, time=None)
            missing = ["time"]
        field = rng.choice(missing)
        pool = PLACES if field == "place" else TIMES
        claim = sentence(replace(hypothesis, **{field: rng.choice(pool)}), rng)
    else:  # denies what the premise says
        claim = negated_sentence(hypothesis, rng)
    return join_pair(sentence(premise, rng), claim)


# ---------------------------------------------------------------------------------------------
# qnli_like: the sentence answers the question: entailment (0) vs not entailment (1)
# ---------------------------------------------------------------------------------------------

QUESTION_FIELDS = {"where": "place", "when": "time", "how": "adverb"}
"""What each question word asks about: the sentence answers iff it says that."""
MODIFIER_POOLS = {"place": PLACES, "time": TIMES, "adverb": ADVERBS}


def question(scene: Scene, rng: random.Random, asks: str) -> str:
    """``where does the dog carry the ball``."""
    subject = words_of(subject_phrase(replace(scene, adjective=None), rng))
    auxiliary = "do" if scene.plural else "does"
    obj = f" the {rng.choice(scene.obj)[0]}" if scene.obj else ""
    return f"{asks} {auxiliary} {subject} {rng.choice(scene.verb)[1]}{obj}"


def qnli_like(rng: random.Random, label: int) -> str:
    asks = rng.choice(tuple(QUESTION_FIELDS))
    field = QUESTION_FIELDS[asks]
    scene = random_scene(rng, modifier_probability=0.5)
    if label == 0:
        answer = replace(scene, **{field: rng.choice(MODIFIER_POOLS[field])})
    else:  # says something else about the same event, but not what is asked
        other = rng.choice([f for f in MODIFIER_POOLS if f != field])
        answer = replace(scene, **{field: None, other: rng.choice(MODIFIER_POOLS[other])})
    return join_pair(question(scene, rng, asks), sentence(answer, rng))


# ---------------------------------------------------------------------------------------------
# The task registry, splits, and the pretraining corpus
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextTask:
    name: str
    glue_task: str
    description: str
    label_names: Tuple[str, ...]
    example: Callable[[random.Random, int], str]
    """``example(rng, label) -> text``: one example of that label."""

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: Dict[str, TextTask] = {
    task.name: task
    for task in (
        TextTask("cola_like", "cola", "acceptability: grammatical sentence or one with an "
                 "agreement, word-order or missing-word error", ("unacceptable", "acceptable"),
                 cola_like),
        TextTask("sst2_like", "sst2", "sentiment of a short review from a polarity lexicon, with "
                 "negation and 'but' clauses", ("negative", "positive"), sst2_like),
        TextTask("rte_like", "rte", "entailment: a less specific or generalised sentence, or a "
                 "negated one, one with the wrong kind of subject or an unsupported detail",
                 ("entailment", "not_entailment"), rte_like),
        TextTask("mnli_like", "mnli", "inference: a less specific sentence, one adding an "
                 "unsupported place or time, or a negated one",
                 ("entailment", "neutral", "contradiction"), mnli_like),
        TextTask("qnli_like", "qnli", "question answering: does the sentence say where/when/how, "
                 "as the question asks", ("entailment", "not_entailment"), qnli_like),
    )
}


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def task_rng(seed: int, name: str) -> random.Random:
    """An independent random stream per (seed, purpose); string seeds are hashed stably."""
    return random.Random(f"{seed}:{name}")


def make_splits(task: TextTask, seed: int, num_train: int, num_test: int,
                num_validation: int = 0) -> Tuple[List[Example], List[Example], List[Example]]:
    """Label-balanced train, test and validation sets with no text in two of them (nor under two
    labels). Validation examples are drawn after the others, so train and test do not depend on
    ``num_validation``."""
    rng = task_rng(seed, task.name)
    per_label_train = _split_evenly(num_train, task.num_labels)
    per_label_test = _split_evenly(num_test, task.num_labels)
    seen: Dict[str, int] = {}
    train: List[Example] = []
    test: List[Example] = []
    for label in range(task.num_labels):
        wanted = per_label_train[label] + per_label_test[label]
        texts = _unique_texts(task, rng, label, wanted, seen)
        train += [Example(t, label) for t in texts[: per_label_train[label]]]
        test += [Example(t, label) for t in texts[per_label_train[label]:]]
    rng.shuffle(train)
    rng.shuffle(test)
    validation: List[Example] = []
    for label, count in enumerate(_split_evenly(num_validation, task.num_labels)):
        validation += [Example(t, label) for t in _unique_texts(task, rng, label, count, seen)]
    rng.shuffle(validation)
    return train, test, validation


def _split_evenly(total: int, parts: int) -> List[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _unique_texts(task: TextTask, rng: random.Random, label: int, count: int,
                  seen: Dict[str, int]) -> List[str]:
    texts: List[str] = []
    attempts = 0
    while len(texts) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise RuntimeError(f"{task.name}: could not draw {count} distinct examples")
        text = task.example(rng, label)
        if text not in seen:
            seen[text] = label
            texts.append(text)
    return texts


def pretraining_document(rng: random.Random) -> str:
    """Unlabelled well-formed text in the tasks' vocabulary: a few sentences about one scene
    (synonyms, generalisations, negations, questions) or a short review."""
    if rng.random() < 0.25:
        reviews = [sst2_like(rng, rng.randrange(2)) for _ in range(rng.randint(1, 2))]
        return f"{SEPARATOR} ".join(reviews)
    scene = random_scene(rng)
    writers = (
        lambda: sentence(scene, rng, front_modifier=rng.random() < 0.3),
        lambda: words_of(_hypothesis_words(entailed_by(scene, rng), rng, rng.random() < 0.5)),
        lambda: negated_sentence(change_one_meaning(scene, rng, ("subject", "verb")), rng),
        lambda: question(scene, rng, rng.choice(tuple(QUESTION_FIELDS))),
    )
    parts = [writers[0]()] + [rng.choice(writers)() for _ in range(rng.randint(0, 2))]
    return f"{SEPARATOR} ".join(parts)


def pretraining_corpus(seed: int, num_documents: int) -> List[str]:
    rng = task_rng(seed, "pretraining")
    return [pretraining_document(rng) for _ in range(num_documents)]
