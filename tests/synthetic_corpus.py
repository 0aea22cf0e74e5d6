"""A corpus that is the same on every Python: generated Python-like text from a fixed linear congruential generator
(the standard library's source, the default corpus, differs between Python versions, and so would every test
scenario tuned to it)."""

from __future__ import annotations

import numpy as np

from swarm.data import Corpus

_WORDS = ("x", "y", "total", "count", "value", "item", "result", "data", "index", "name", "size", "step", "key")
_OPS = ("+", "-", "*", "//", "%", "<<", "&")


def synthetic_corpus(n_bytes: int = 1 << 20, seed: int = 12345) -> Corpus:
    """About ``n_bytes`` of function definitions, loops and arithmetic (train) and 5% more (validation)."""
    state = seed

    def rand(n: int) -> int:
        nonlocal state
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        return (state >> 33) % n

    def word() -> str:
        return _WORDS[rand(len(_WORDS))]

    def text(limit: int) -> bytes:
        lines, size, i = [], 0, 0
        while size < limit:
            i += 1
            body = [f"def {word()}_{i}({word()}, {word()}={rand(10)}):\n"]
            for _ in range(1 + rand(5)):
                kind = rand(4)
                if kind == 0:
                    loop = f"    for {word()} in range({rand(100)}):\n"
                    body.append(loop + f"        {word()} += {word()} {_OPS[rand(7)]} {rand(9)}\n")
                elif kind == 1:
                    body.append(f"    if {word()} > {rand(50)}:\n        return {word()}\n")
                elif kind == 2:
                    body.append(f"    # {word()} of the {word()}s, then the {word()}\n")
                else:
                    body.append(f"    {word()} = {word()} {_OPS[rand(7)]} {word()}\n")
            body.append(f"    return {word()}\n\n")
            chunk = "".join(body)
            lines.append(chunk)
            size += len(chunk)
        return "".join(lines).encode()

    train = np.frombuffer(text(n_bytes), np.uint8).copy()
    val = np.frombuffer(text(n_bytes // 20), np.uint8).copy()
    return Corpus(train, val, f"synthetic:{seed}", 1, 1, ("synthetic",), ("synthetic-val",))
