"""A token corpus for the retrieval drafters' static indexes (SAM-Decoding's static automaton,
SuffixDecoding's global tree): a list of documents, each a list of token ids.

Stored as one .npz: `tokens` (all documents concatenated, int32) and `offsets` (D + 1,) int64,
plus `vocab_size`, and `sources`: the ids of the prompts it was built from, where known. Built by
`specdec corpus` from the model's own responses to a prompt set; `specdec bench` refuses a corpus
built from a question it measures (a drafter would retrieve the very answer it is timed on).
"""

import os
from pathlib import Path

import numpy as np


class Corpus:
    def __init__(self, documents, vocab_size: int, sources=None):
        docs = [np.asarray(d, dtype=np.int64).ravel() for d in documents]
        docs = [d for d in docs if d.size]
        if not docs:
            raise ValueError("empty corpus: no document has any token")
        if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        flat = np.concatenate(docs)
        bad = flat[(flat < 0) | (flat >= vocab_size)]
        if bad.size:
            raise ValueError(f"corpus has token ids outside [0, {vocab_size}): {bad[:5].tolist()}")
        self.tokens = flat.astype(np.int32)
        self.offsets = np.concatenate([[0], np.cumsum([d.size for d in docs])]).astype(np.int64)
        self.vocab_size = int(vocab_size)
        self.sources = None if sources is None else [str(x) for x in sources]  # prompt ids, None: unknown

    @classmethod
    def of(cls, corpus) -> "Corpus | None":
        """A drafter's `corpus` argument as a Corpus: None, a Corpus, or the path of a saved one."""
        if isinstance(corpus, (str, os.PathLike)):
            return cls.load(corpus)
        if corpus is not None and not isinstance(corpus, cls):
            raise TypeError(f"corpus must be None, a Corpus or a path, got {type(corpus).__name__}")
        return corpus

    def check_vocab(self, vocab_size: int) -> None:
        """Raise unless every token id is inside the model's vocabulary."""
        top = int(self.tokens.max())
        if top >= vocab_size:
            raise ValueError(f"corpus has token id {top} >= the model's vocab_size {vocab_size}: "
                             "it was built with another tokenizer")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def documents(self):
        return [self[i] for i in range(len(self))]

    def save(self, path):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {} if self.sources is None else {"sources": np.array(self.sources, dtype=str)}
        np.savez_compressed(path, tokens=self.tokens, offsets=self.offsets, vocab_size=self.vocab_size, **extra)

    @classmethod
    def load(cls, path) -> "Corpus":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no corpus at {path}: build one with `specdec corpus`")
        with np.load(path) as z:
            if not {"tokens", "offsets", "vocab_size"} <= set(z.files):
                raise ValueError(f"{path} is not a specdec corpus (expected tokens, offsets, vocab_size)")
            tokens, offsets, vocab = z["tokens"], z["offsets"], int(z["vocab_size"])
            sources = z["sources"].tolist() if "sources" in z.files else None
        return cls([tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:])], vocab, sources)

    @staticmethod
    def sources_of(path):
        """The prompt ids a saved corpus was built from (without loading its tokens); None: unknown."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no corpus at {path}: build one with `specdec corpus`")
        with np.load(path) as z:
            return z["sources"].tolist() if "sources" in z.files else None
