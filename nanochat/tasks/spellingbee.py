"""Synthetic spelling tasks from an English word list (offline once the list is local).

SpellingBee: "How many r are in strawberry?" The answer spells the word out letter by
letter with a running count, then double-checks with the calculator tool
(`'strawberry'.count('r')`) and ends with '#### 3'. SimpleSpelling: "Spell the word: cat"
→ "cat:c,a,t". Both teach a small model to see the letters inside its tokens.

Examples are generated from the index with a seeded RNG, so a task is an infinite,
reproducible list (`size` picks how many). Words are split into train and test by a
hash of the word, so test questions are about words never seen in training.

Word list: <data_dir>/words/words_alpha.txt[.gz], else downloaded once (dwyl/english-words) into
<base_dir>/downloads/ through nanochat.hub, or pass `words=[...]`.
"""
from __future__ import annotations

import functools
import gzip
from typing import Sequence

from nanochat.tasks.common import Conversation, Synthetic, local_or_url

WORD_LIST_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
LETTERS = "abcdefghijklmnopqrstuvwxyz"

QUESTION_TEMPLATES = [
    "How many {letter} are in the word {word}",
    "How many {letter} are in {word}",
    "How many times does the letter {letter} appear in {word}",
    "Count the number of {letter} in {word}",
    "How many {letter}s does {word} have",
    "In the word {word}, how many {letter} are there",
    "What is the count of letter {letter} in {word}",
    "Count how many times {letter} occurs in {word}",
]


@functools.lru_cache(maxsize=4)
def _read_words(path: str) -> tuple[str, ...]:
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return tuple(w for w in (line.strip().lower() for line in f) if w.isalpha() and w.isascii())


def load_words(data_dir: str | None = None, base_dir: str | None = None) -> tuple[str, ...]:
    return _read_words(str(local_or_url(["words/words_alpha.txt.gz", "words/words_alpha.txt"], data_dir,
                                        WORD_LIST_URL, base_dir, "no word list for the spelling tasks",
                                        "Put words_alpha.txt(.gz) under <shared data>/words/ or pass words=[...]")))


class _WordTask(Synthetic):
    def __init__(self, split: str = "train", size: int = 1000, words: Sequence[str] | None = None,
                 min_len: int = 1, max_len: int | None = None, data_dir: str | None = None,
                 base_dir: str | None = None, **kwargs):
        super().__init__(split, size, **kwargs)
        if size < 1:
            raise ValueError(f"{type(self).__name__} size={size}: must be >= 1")
        pool = words if words is not None else load_words(data_dir, base_dir)
        want_test = split == "test"
        self.words = [w for w in pool if min_len <= len(w) <= (max_len or len(w)) and self.in_test(w) == want_test]
        if not self.words:
            raise ValueError(f"{type(self).__name__}: no {split} words of length {min_len}..{max_len}")


class SpellingBee(_WordTask):
    """Count a letter in a word. style='full' spells it out then checks with the tool (nanochat);
    style='tool' answers with the tool call alone (easier for tiny models)."""

    def __init__(self, split: str = "train", size: int = 1000, style: str = "full", **kwargs):
        if style not in ("full", "tool"):
            raise ValueError(f"SpellingBee style={style!r}: use 'full' or 'tool'")
        self.style = style
        super().__init__(split=split, size=size, **kwargs)

    def get_example(self, index: int) -> Conversation:
        rng = self.rng(index)
        word = rng.choice(self.words)
        # mostly letters that occur (the interesting case), sometimes any letter (answer 0)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice(LETTERS)
        count = word.count(letter)
        template = rng.choice(QUESTION_TEMPLATES)
        if rng.random() < 0.3:
            template = template.lower()
        q_letter, q_word = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        question = template.format(letter=f"{q_letter}{letter}{q_letter}", word=f"{q_word}{word}{q_word}")
        if rng.random() < 0.5:
            question += "?"
        parts = []
        if self.style == "full":
            lines = [f"We need to count the letter '{letter}' in the word '{word}'. First I spell it out:",
                     f"{word}:{','.join(word)}", "", f"Now I count the '{letter}':"]
            lines += [f"{i}:{ch} hit! count={word[:i].count(letter)}" if ch == letter else f"{i}:{ch}"
                      for i, ch in enumerate(word, 1)]
            lines += ["", f"That gives {count}. Let me double check with Python:", "", ""]
            parts.append({"type": "text", "text": "\n".join(lines)})
        tail = "\n\nBoth ways agree. #### " if self.style == "full" else "\n\n#### "
        parts += [{"type": "python", "text": f"'{word}'.count('{letter}')"},
                  {"type": "python_output", "text": str(count)}, {"type": "text", "text": f"{tail}{count}"}]
        return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": parts}],
                "word": word, "letter": letter, "answer": count}


class SimpleSpelling(_WordTask):
    """Spell a word letter by letter: "Spell the word: cat" → "cat:c,a,t"."""

    def get_example(self, index: int) -> Conversation:
        word = self.rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": f"{word}:{','.join(word)}"}],
                "word": word}

    def evaluate(self, conversation: Conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
