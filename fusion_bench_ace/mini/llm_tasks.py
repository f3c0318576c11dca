"""Seeded generators of the embedded LLM track's text: a pretraining corpus and four tasks.

Pure Python on a ``random.Random`` passed in (no global random state, no download), so a seed
always gives the same text. The tasks mirror the three expert groups of ACE-Merging's Table 8
(multilingual QA, math word problems, code generation) in a world small enough for a CPU:

- ``qa_lang_a``, ``qa_lang_b`` (the *multilingual* expert; xquad_zh / xquad_vi): question
  answering in two synthetic languages. A context sentence ("who does what to what, where") and a
  question word plus the verb; the answer is the word the question asks for, copied from the
  context. Language A is SVO with a preposition; language B is SOV with an object marker and a
  postposition. Each has its own words and question words.
- ``word_problems`` (the *math* expert; gsm8k_cot): two-digit addition and subtraction (digit by
  digit, without carrying or borrowing) told as a story in English, answered with the equation,
  then the result ("23 + 41 = 64 . the answer is 64"): a short chain of thought.
- ``code_completion`` (the *coding* expert; humaneval): a comment saying what a two-argument
  function returns and its signature; the answer is the ``return`` line, with the arguments the
  comment names in the order it names them.

As a base LLM knows what instruction tuning then asks for, the pretraining corpus holds each
skill in running text - stories in English and both languages with in-language questions and
their answers, stories with numbers followed by their equation, commented functions - and, as
the instruct model the experts of ACE Table 8 start from has seen instructions, a small share of
each task's examples in its format (``context :``, ``problem :``, the ``answer :`` marker every
task prompt ends with), never one of the tasks' split prompts. The pretrained model therefore
answers part of every task, and each expert sharpens what it already half knows with a small
update (fine-tuning gently, as real experts are).

Text is space-separated tokens (digits are split further by the tokenizer); `` \\n `` marks a
line break of code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Collection, Dict, List, Optional, Sequence, Tuple

PROMPT_END = "answer :"
"""Every task prompt ends with this marker; the completion follows it."""

# --- the world: who does what to what, where (English words; each language renames them) -------

AGENTS = ("man", "woman", "child", "doctor", "teacher", "farmer", "baker", "king", "queen",
          "boy", "girl", "student", "dog", "cat", "bird", "horse")
OBJECTS = ("ball", "book", "apple", "letter", "cup", "hat", "box", "bag", "key", "coin",
           "bread", "flower", "stone", "map")
VERBS = ("sees", "finds", "carries", "buys", "takes", "holds", "drops", "opens", "paints",
         "wants", "likes", "hides")
PLACES = ("park", "garden", "kitchen", "city", "school", "shop", "forest", "house", "river",
          "field")


@dataclass(frozen=True)
class Event:
    agent: str
    verb: str
    obj: str
    place: str


def random_event(rng: random.Random) -> Event:
    return Event(rng.choice(AGENTS), rng.choice(VERBS), rng.choice(OBJECTS), rng.choice(PLACES))


def _syllable_words(seed: str, count: int, syllables: Sequence[str], taken: set) -> List[str]:
    """``count`` distinct two- or three-syllable words, none in ``taken`` (fixed by ``seed``)."""
    rng = random.Random(seed)
    words: List[str] = []
    while len(words) < count:
        word = "".join(rng.choice(syllables) for _ in range(rng.choice((2, 2, 3))))
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class Language:
    """A synthetic language: its own words for the world, its word order, its question words."""

    name: str
    lexicon: Dict[str, str]
    function_words: Dict[str, str]
    """``preposition`` (A) or ``object_marker``/``postposition`` (B)."""
    questions: Dict[str, str]
    """Question word asking for ``agent``, ``obj`` or ``place``."""
    order: str  # "svo" (A) or "sov" (B)

    def sentence(self, event: Event) -> str:
        w = self.lexicon
        f = self.function_words
        if self.order == "svo":
            return (f"{w[event.agent]} {w[event.verb]} {w[event.obj]} {f['preposition']} "
                    f"{w[event.place]} .")
        return (f"{w[event.agent]} {f['object_marker']} {w[event.obj]} {w[event.place]} "
                f"{f['postposition']} {w[event.verb]} .")

    def question(self, event: Event, asks: str) -> str:
        """A question about ``event`` naming its verb (and its agent, unless asking for it)."""
        w, q = self.lexicon, self.questions
        if asks == "agent":
            return f"{q['agent']} {w[event.verb]} ?"
        return f"{q[asks]} {w[event.agent]} {w[event.verb]} ?"


def _make_languages() -> Dict[str, Language]:
    taken = set(AGENTS + OBJECTS + VERBS + PLACES)
    world = AGENTS + OBJECTS + VERBS + PLACES
    lang_a_words = _syllable_words("lang_a", len(world) + 5,
                                   ("ka", "lo", "mi", "ra", "ta", "se", "no", "vi", "pe", "du"),
                                   taken)
    lang_b_words = _syllable_words("lang_b", len(world) + 5,
                                   ("zu", "ob", "ek", "ma", "ri", "fa", "ul", "sho", "gen", "ix"),
                                   taken)
    a = Language(
        "lang_a", dict(zip(world, lang_a_words)),
        {"preposition": lang_a_words[-2]},
        {"agent": lang_a_words[-3], "obj": lang_a_words[-4], "place": lang_a_words[-5]}, "svo")
    b = Language(
        "lang_b", dict(zip(world, lang_b_words)),
        {"object_marker": lang_b_words[-1], "postposition": lang_b_words[-2]},
        {"agent": lang_b_words[-3], "obj": lang_b_words[-4], "place": lang_b_words[-5]}, "sov")
    return {"lang_a": a, "lang_b": b}


LANGUAGES = _make_languages()


def english_sentence(event: Event) -> str:
    return f"the {event.agent} {event.verb} the {event.obj} in the {event.place} ."


# --- tasks -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


def qa_example(language: Language, rng: random.Random) -> Example:
    event = random_event(rng)
    asks = rng.choice(("agent", "obj", "place"))
    prompt = (f"context : {language.sentence(event)} question : "
              f"{language.question(event, asks)} {PROMPT_END}")
    return Example(prompt, language.lexicon[getattr(event, asks)])


def _no_carry_pair(rng: random.Random, subtract: bool) -> Tuple[int, int]:
    """Two two-digit numbers whose sum (difference) needs no carrying (borrowing)."""
    tens = sorted((rng.randint(1, 9), rng.randint(1, 9)))
    units = sorted((rng.randint(0, 9), rng.randint(0, 9)))
    if subtract:  # a - b, each digit of a at least that of b
        return 10 * tens[1] + units[1], 10 * tens[0] + units[0]
    while tens[0] + tens[1] > 9:
        tens = [rng.randint(1, 8), rng.randint(1, 8)]
    while units[0] + units[1] > 9:
        units = [rng.randint(0, 9), rng.randint(0, 9)]
    return 10 * tens[0] + units[0], 10 * tens[1] + units[1]


GAINS = ("the {agent} buys {b} more {thing}", "the {agent} finds {b} more {thing}",
         "a friend gives the {agent} {b} {thing}")
LOSSES = ("the {agent} gives away {b} {thing}", "the {agent} loses {b} {thing}",
          "the {agent} sells {b} {thing}")


def _story_problem(rng: random.Random) -> Tuple[str, str, int]:
    """``(story, equation, result)`` of a two-step story about a person's things."""
    agent = rng.choice(AGENTS[:12])  # people
    thing = rng.choice(OBJECTS) + "s"
    subtract = rng.random() < 0.5
    a, b = _no_carry_pair(rng, subtract)
    change = rng.choice(LOSSES if subtract else GAINS).format(agent=agent, b=b, thing=thing)
    story = f"the {agent} has {a} {thing} . {change} ."
    question = f"how many {thing} does the {agent} have now ?"
    return f"{story} {question}", f"{a} {'-' if subtract else '+'} {b}", a - b if subtract \
        else a + b


def word_problem_example(rng: random.Random) -> Example:
    story, equation, result = _story_problem(rng)
    return Example(f"problem : {story} {PROMPT_END}",
                   f"{equation} = {result} . the answer is {result}")


ARGUMENT_NAMES = ("a", "b", "x", "y", "n", "m", "p", "q", "u", "v", "s", "t")
FUNCTION_NAMES = ("f", "g", "h", "calc", "combine", "solve", "pick", "apply")

# what the comment says (with {0}/{1} the arguments in the order it names them) -> the body
OPERATIONS: Tuple[Tuple[str, str], ...] = (
    ("the sum of {0} and {1}", "{0} + {1}"),
    ("{0} plus {1}", "{0} + {1}"),
    ("{0} minus {1}", "{0} - {1}"),
    ("the difference of {0} and {1}", "{0} - {1}"),
    ("the product of {0} and {1}", "{0} * {1}"),
    ("{0} times {1}", "{0} * {1}"),
    ("the larger of {0} and {1}", "max ( {0} , {1} )"),
    ("the smaller of {0} and {1}", "min ( {0} , {1} )"),
    ("{0} squared", "{0} * {0}"),
    ("twice {0}", "2 * {0}"),
    ("{0} plus one", "{0} + 1"),
    ("{0} divided by {1}", "{0} / {1}"),
)


def _function(rng: random.Random) -> Tuple[str, str]:
    """``(comment and signature, return line)`` of a two-argument function."""
    first, second = rng.sample(ARGUMENT_NAMES, 2)
    description, body = rng.choice(OPERATIONS)
    named = (first, second) if rng.random() < 0.5 else (second, first)
    head = (f"# return {description.format(*named)} \\n def {rng.choice(FUNCTION_NAMES)} ( "
            f"{first} , {second} ) : \\n")
    return head, f"return {body.format(*named)}"


def code_example(rng: random.Random) -> Example:
    head, body = _function(rng)
    return Example(f"{head} {PROMPT_END}", body)


@dataclass(frozen=True)
class LLMTask:
    name: str
    expert: str
    """The expert group whose fine-tuning data this task is (ACE Table 9's relevant expert)."""
    description: str
    generate: Callable[[random.Random], Example]


TASKS: Dict[str, LLMTask] = {
    "qa_lang_a": LLMTask("qa_lang_a", "multilingual",
                         "extractive QA in synthetic language A (SVO)",
                         lambda rng: qa_example(LANGUAGES["lang_a"], rng)),
    "qa_lang_b": LLMTask("qa_lang_b", "multilingual",
                         "extractive QA in synthetic language B (SOV)",
                         lambda rng: qa_example(LANGUAGES["lang_b"], rng)),
    "word_problems": LLMTask("word_problems", "math",
                             "two-digit addition/subtraction word problems, equation then result",
                             word_problem_example),
    "code_completion": LLMTask("code_completion", "coding",
                               "complete a two-argument function from its comment",
                               code_example),
}
EXPERTS: Dict[str, List[str]] = {}
for _task in TASKS.values():
    EXPERTS.setdefault(_task.expert, []).append(_task.name)


def task_rng(seed: int, name: str) -> random.Random:
    return random.Random(f"{seed}:{name}")


def make_splits(task: LLMTask, seed: int, sizes: Dict[str, int]) -> Dict[str, List[Example]]:
    """Disjoint splits (no prompt in two splits), in the order of ``sizes`` (e.g. train,
    validation, test)."""
    rng = task_rng(seed, task.name)
    seen: set = set()
    splits: Dict[str, List[Example]] = {}
    for split, count in sizes.items():
        examples: List[Example] = []
        attempts = 0
        while len(examples) < count:
            example = task.generate(rng)
            attempts += 1
            if attempts > 100 * count + 1000:
                raise RuntimeError(f"{task.name}: cannot draw {count} distinct {split} prompts")
            if example.prompt in seen:
                continue
            seen.add(example.prompt)
            examples.append(example)
        splits[split] = examples
    return splits


# --- pretraining ---------------------------------------------------------------------------------


def _equation(rng: random.Random) -> str:
    subtract = rng.random() < 0.5
    a, b = _no_carry_pair(rng, subtract)
    return f"{a} - {b} = {a - b} ." if subtract else f"{a} + {b} = {a + b} ."


def _language_document(rng: random.Random, language: Language) -> str:
    """Sentences of ``language``, each followed by a question about it and its answer."""
    parts = []
    for _ in range(rng.randint(2, 4)):
        event = random_event(rng)
        asks = rng.choice(("agent", "obj", "place"))
        parts.append(f"{language.sentence(event)} {language.question(event, asks)} "
                     f"{language.lexicon[getattr(event, asks)]} .")
    return " ".join(parts)


def _english_document(rng: random.Random) -> str:
    return " ".join(english_sentence(random_event(rng)) for _ in range(rng.randint(2, 5)))


def _numbers_document(rng: random.Random) -> str:
    """Equations, or a story with numbers and the equation that answers it."""
    if rng.random() < 0.5:
        return " ".join(_equation(rng) for _ in range(rng.randint(3, 6)))
    story, equation, result = _story_problem(rng)
    return f"{story} {equation} = {result} . so {result} ."


def _code_document(rng: random.Random) -> str:
    return " ".join(" ".join(_function(rng)) + " \\n" for _ in range(rng.randint(1, 3)))


PRETRAINING_MIX: Tuple[Tuple[str, float], ...] = (
    ("english", 0.1), ("lang_a", 0.25), ("lang_b", 0.25), ("numbers", 0.25), ("code", 0.15),
)


def pretraining_document(rng: random.Random) -> str:
    """One document of one kind of ``PRETRAINING_MIX``."""
    kind = rng.choices([k for k, _ in PRETRAINING_MIX], [w for _, w in PRETRAINING_MIX])[0]
    if kind == "english":
        return _english_document(rng)
    if kind in LANGUAGES:
        return _language_document(rng, LANGUAGES[kind])
    if kind == "numbers":
        return _numbers_document(rng)
    return _code_document(rng)


def pretraining_corpus(seed: int, num_documents: int,
                       task_shares: Optional[Dict[str, float]] = None,
                       exclude: Collection[str] = ()) -> List[str]:
    """``num_documents`` documents; each is, with probability ``task_shares[task]``, an example
    of ``task`` in its instruction format (``prompt answer``), never one whose prompt is in
    ``exclude`` (the tasks' splits). Those come from their own random stream, so the rest of the
    corpus is the same whatever the shares."""
    task_shares = dict(task_shares or {})
    unknown = set(task_shares) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks in the pretraining shares: {sorted(unknown)}")
    if any(not 0 <= share <= 1 for share in task_shares.values()):
        raise ValueError(f"pretraining task shares must lie in [0, 1]: {task_shares}")
    shares = {name: share for name, share in task_shares.items() if share > 0}
    total = sum(shares.values())
    if total > 1:
        raise ValueError(f"the pretraining task shares add up to {total} > 1")
    rng = task_rng(seed, "pretraining")
    mix = task_rng(seed, "pretraining/instructions")
    documents = []
    for _ in range(num_documents):
        if total and mix.random() < total:
            task = TASKS[mix.choices(list(shares), list(shares.values()))[0]]
            documents.append(_instruction_document(task, mix, exclude))
        else:
            documents.append(pretraining_document(rng))
    return documents


def _instruction_document(task: LLMTask, rng: random.Random, exclude: Collection[str]) -> str:
    while True:
        example = task.generate(rng)
        if example.prompt not in exclude:
            return f"{example.prompt} {example.answer}"
