"""Two more small tasks beside the demo's dates, for routing among adapters trained on distinct tasks.

- `numbers`: an English number in words ("three thousand forty-two") to its digits ("3042"), 0-9999.
- `snake`: a CamelCase identifier ("MeetingRoomBooking") to snake_case ("meeting_room_booking").
Each is a chat example with its own system prompt and a short exact answer, like demo_task's; each
held-out example is an input no training example has.
"""

from __future__ import annotations

import random

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORDS = ["account", "balance", "booking", "cache", "client", "config", "data", "date", "event", "file", "index",
         "invoice", "item", "key", "list", "loader", "meeting", "model", "order", "page", "parser", "query", "record",
         "report", "request", "room", "schema", "server", "session", "task", "token", "user", "value", "window"]
NUMBERS_PROMPT = "You convert numbers written in English words to digits. Reply with the digits only."
SNAKE_PROMPT = "You convert CamelCase identifiers to snake_case. Reply with the identifier only."
MAX_NEW_TOKENS = 16


def in_words(n: int) -> str:
    """0-9999 in English words: 3042 -> 'three thousand forty-two'."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else f"-{ONES[n % 10]}")
    if n < 1000:
        return f"{ONES[n // 100]} hundred" + ("" if n % 100 == 0 else f" {in_words(n % 100)}")
    return f"{ONES[n // 1000]} thousand" + ("" if n % 1000 == 0 else f" {in_words(n % 1000)}")


def _chat(system: str, user: str, answer: str) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def number_example(n: int) -> dict:
    """The chat example for number n."""
    return _chat(NUMBERS_PROMPT, f"Number: {in_words(n)}", str(n))


def snake_example(words: tuple[str, ...]) -> dict:
    """The chat example for an identifier made of `words`."""
    return _chat(SNAKE_PROMPT, f"Identifier: {''.join(w.capitalize() for w in words)}", "_".join(words))


def number_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) on distinct numbers; same seed, same lists."""
    picks = random.Random(f"numbers-{seed}").sample(range(10_000), n_train + n_heldout)
    return [number_example(n) for n in picks[:n_train]], [number_example(n) for n in picks[n_train:]]


def snake_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held-out) on distinct identifiers of 2-4 words; same seed, same lists."""
    rng, seen, picks = random.Random(f"snake-{seed}"), set(), []
    while len(picks) < n_train + n_heldout:
        words = tuple(rng.sample(WORDS, rng.randint(2, 4)))
        if words not in seen:
            seen.add(words)
            picks.append(words)
    return [snake_example(w) for w in picks[:n_train]], [snake_example(w) for w in picks[n_train:]]
