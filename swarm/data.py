"""Byte-level training data; nothing is downloaded.

The default corpus is the source of the running Python's standard library (``*.py`` under
``sysconfig.get_paths()["stdlib"]``, excluding ``site-packages``, ``dist-packages`` and ``test``/``tests``/``idlelib``
directories). Tokens are raw bytes (vocabulary 256).

The train/validation split is by file and deterministic: a file (relative POSIX path ``rel``) goes to validation iff
``int(sha256(rel).hexdigest()[:8], 16) / 2**32 < val_fraction``. A single text file is split by bytes instead
(the last ``val_fraction`` of it is validation).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import stat
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "Corpus",
    "BatchSampler",
    "default_corpus_root",
    "load_corpus",
    "validation_batches",
    "is_val_file",
    "TEXT_SUFFIXES",
]

TEXT_SUFFIXES = frozenset(
    {".py", ".txt", ".md", ".rst", ".c", ".h", ".json", ".toml", ".cfg", ".ini", ".html", ".js", ".rs", ".go", ".java"}
)
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib"})
# Never part of a corpus: version-control internals and bytecode caches.
ALWAYS_EXCLUDED_DIRS = frozenset({".git", ".hg", ".svn", "__pycache__"})
SEPARATOR = b"\n"


@dataclass
class Corpus:
    """A byte corpus split into train and validation parts.

    ``train``/``val`` are 1-D ``uint8`` arrays; ``train_files``/``val_files`` are the relative paths (sorted) that
    contributed bytes to each part (for a single-file corpus both name that file).
    """

    train: np.ndarray
    val: np.ndarray
    source: str
    n_files_train: int
    n_files_val: int
    train_files: tuple[str, ...] = field(default=(), repr=False)
    val_files: tuple[str, ...] = field(default=(), repr=False)


def default_corpus_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_val_file(rel_path: str, val_fraction: float) -> bool:
    """The by-file split rule: ``int(sha256(rel_path).hexdigest()[:8], 16) / 2**32 < val_fraction``."""
    h = int(hashlib.sha256(rel_path.encode("utf-8")).hexdigest()[:8], 16)
    return h / 2**32 < val_fraction


def _walk(root: Path, excluded_dirs: frozenset[str]) -> list[tuple[str, int]]:
    """``(relative POSIX path, size)`` of every non-empty regular file under ``root`` (symlinks not followed),
    sorted by relative path, skipping directories named in ``excluded_dirs``."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in excluded_dirs]
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                st = os.stat(full, follow_symlinks=False)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
                continue
            out.append((Path(os.path.relpath(full, root)).as_posix(), st.st_size))
    out.sort()
    return out


@functools.lru_cache(maxsize=4)
def _stdlib_files(root: str) -> tuple[tuple[str, int], ...]:
    files = _walk(Path(root), STDLIB_EXCLUDED_DIRS | ALWAYS_EXCLUDED_DIRS)
    return tuple(f for f in files if f[0].endswith(".py"))


def _folder_files(root: Path) -> list[tuple[str, int]]:
    files = _walk(root, ALWAYS_EXCLUDED_DIRS)
    text = [f for f in files if Path(f[0]).suffix.lower() in TEXT_SUFFIXES]
    return text if text else files


def _read_capped(root: Path, files: list[tuple[str, int]], budget: int | None) -> tuple[np.ndarray, tuple[str, ...]]:
    """Concatenate ``files`` (in order, ``SEPARATOR``-joined) until ``budget`` bytes are reached; truncate to it."""
    buf = bytearray()
    used: list[str] = []
    for rel, _ in files:
        if budget is not None and len(buf) >= budget:
            break
        if buf:
            buf += SEPARATOR
        with open(root / rel, "rb") as fh:
            buf += fh.read()
        used.append(rel)
    if budget is not None:
        del buf[budget:]
    return np.frombuffer(buf, dtype=np.uint8), tuple(used)


def _split_single_file(
    data: bytes, name: str, source: str, val_fraction: float, train_cap: int | None, val_cap: int | None
) -> Corpus:
    """Byte split of a one-file corpus: the last ``val_fraction`` of the bytes (at least one) is validation."""
    if not data:
        raise ValueError(f"no text in corpus {source}: {name} is empty")
    n_val = max(1, int(round(len(data) * val_fraction)))
    if len(data) - n_val < 1:
        raise ValueError(f"no text to split in corpus {source}: {name} has only {len(data)} byte(s)")
    train_b, val_b = data[: len(data) - n_val], data[len(data) - n_val :]
    if train_cap is not None:
        train_b, val_b = train_b[:train_cap], val_b[:val_cap]
    return Corpus(
        train=np.frombuffer(bytearray(train_b), dtype=np.uint8),
        val=np.frombuffer(bytearray(val_b), dtype=np.uint8),
        source=source,
        n_files_train=1,
        n_files_val=1,
        train_files=(name,),
        val_files=(name,),
    )


def load_corpus(
    path: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.05,
    max_bytes: int | None = 16 * 2**20,
) -> Corpus:
    """Load a byte corpus and split it into train/validation.

    ``path``: ``None`` (Python stdlib source), a text file, or a folder (all regular files with a suffix in
    ``TEXT_SUFFIXES``, recursively; if none match, all regular files). Empty files are skipped; files are taken in
    sorted relative-path order and joined with ``b"\\n"``.

    Split by file (see module doc); if no file falls in validation the last file goes there (and if none falls in
    train, the first goes there). ``max_bytes`` then caps val to ``ceil(max_bytes * val_fraction)`` bytes and
    train to the rest of ``max_bytes``: files are read in order until the cap is reached and the
    part is truncated to it.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for bad arguments or a corpus without text.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if max_bytes is not None and max_bytes < 2:
        raise ValueError(f"max_bytes must be >= 2 or None, got {max_bytes}")
    train_cap = val_cap = None
    if max_bytes is not None:
        val_cap = max(1, math.ceil(max_bytes * val_fraction))
        train_cap = max(1, max_bytes - val_cap)

    if path is None:
        root = default_corpus_root()
        files = list(_stdlib_files(str(root)))
        source = f"python-stdlib:{root}"
    else:
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"corpus path does not exist: {p}")
        source = str(p.resolve())
        if p.is_file():
            return _split_single_file(p.read_bytes(), p.name, source, val_fraction, train_cap, val_cap)
        root = p
        files = _folder_files(root)

    if not files:
        raise ValueError(f"no text files found in corpus {source}")
    if len(files) == 1:
        # one file in a folder: fall back to the byte split
        rel = files[0][0]
        return _split_single_file((root / rel).read_bytes(), rel, source, val_fraction, train_cap, val_cap)

    train_files = [f for f in files if not is_val_file(f[0], val_fraction)]
    val_files = [f for f in files if is_val_file(f[0], val_fraction)]
    if not val_files:
        val_files = [train_files.pop()]
    if not train_files:
        train_files = [val_files.pop(0)]

    train, train_used = _read_capped(root, train_files, train_cap)
    val, val_used = _read_capped(root, val_files, val_cap)
    return Corpus(
        train=train,
        val=val,
        source=source,
        n_files_train=len(train_used),
        n_files_val=len(val_used),
        train_files=train_used,
        val_files=val_used,
    )


class BatchSampler:
    """Random contiguous windows of a byte array, deterministic per ``seed``.

    ``sample()`` returns ``(x, y)``, both ``LongTensor[batch_size, seq_len]`` on CPU, with ``y[:, t] == x[:, t + 1]``
    (i.e. ``y`` is the window shifted by one byte). Offsets come from ``numpy.random.default_rng(seed)``;
    ``state_dict``/``load_state_dict`` capture the generator so a resumed run draws the same next batch.
    """

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        data = np.asarray(data)
        if data.ndim != 1:
            raise ValueError(f"data must be 1-D, got shape {data.shape}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if len(data) < seq_len + 1:
            raise ValueError(f"no text to sample: data has {len(data)} tokens, need >= seq_len + 1 = {seq_len + 1}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.n_sampled = 0
        self._rng = np.random.default_rng(seed)
        self._window = np.arange(seq_len + 1)

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = self._rng.integers(0, len(self.data) - self.seq_len, size=self.batch_size)
        chunk = self.data[offsets[:, None] + self._window].astype(np.int64)
        self.n_sampled += 1
        return torch.from_numpy(chunk[:, :-1].copy()), torch.from_numpy(chunk[:, 1:].copy())

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "n_sampled": self.n_sampled,
            "rng": copy.deepcopy(self._rng.bit_generator.state),
        }

    def load_state_dict(self, d: dict) -> None:
        if (d["batch_size"], d["seq_len"]) != (self.batch_size, self.seq_len):
            raise ValueError(
                f"sampler state is for batch_size={d['batch_size']}, seq_len={d['seq_len']}; "
                f"this sampler has batch_size={self.batch_size}, seq_len={self.seq_len}"
            )
        self.seed = d["seed"]
        self.n_sampled = d["n_sampled"]
        self._rng.bit_generator.state = copy.deepcopy(d["rng"])


def validation_batches(
    data: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n_batches`` deterministic ``(x, y)`` batches (``LongTensor[batch_size, seq_len]``, ``y`` = ``x`` shifted
    by one) whose ``batch_size * n_batches`` windows start at evenly spaced offsets from the first to the last
    possible one. Same result every call. ``ValueError`` if ``data`` is shorter than ``seq_len + 1``."""
    data = np.asarray(data)
    if batch_size < 1 or seq_len < 1 or n_batches < 1:
        raise ValueError(f"batch_size, seq_len and n_batches must be >= 1, got {batch_size}, {seq_len}, {n_batches}")
    if data.ndim != 1 or len(data) < seq_len + 1:
        raise ValueError(f"no text to validate on: data has {len(data)} tokens, need at least {seq_len + 1}")
    n = batch_size * n_batches
    offsets = np.round(np.linspace(0, len(data) - seq_len - 1, num=n)).astype(np.int64)
    chunks = data[offsets[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    x = torch.from_numpy(chunks[:, :-1].copy()).view(n_batches, batch_size, seq_len)
    y = torch.from_numpy(chunks[:, 1:].copy()).view(n_batches, batch_size, seq_len)
    return [(x[i].clone(), y[i].clone()) for i in range(n_batches)]
