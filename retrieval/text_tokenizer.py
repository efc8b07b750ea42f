"""open_clip's CLIP tokenizer without torch: the same token ids from Hugging Face `tokenizers`.

open_clip's `SimpleTokenizer` is the byte-level BPE of OpenAI CLIP (49,408 ids, words end in
`</w>`), but its module imports torch, which costs seconds at start-up. Here the text goes
through the very same cleaning (ftfy, HTML unescaping, whitespace, lower case) and the same
word-splitting regex as open_clip, in Python, with the same libraries (`ftfy`, `regex`);
`tokenizers` then runs the byte-level BPE over each word, built from open_clip's own
`bpe_simple_vocab_16e6.txt.gz`. tests/test_cold_search.py checks the ids against open_clip's.

Only that tokenizer (with its default `lower` cleaning) is reproduced: models with an HF or
SigLIP tokenizer, another cleaning or a token-reduction strategy keep the torch path.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")
N_MERGES = 49152 - 256 - 2  # as open_clip reads the file
VOCAB_SIZE = 2 * 256 + N_MERGES + len(SPECIAL_TOKENS)  # 49408


def open_clip_vocab_path() -> Path:
    """open_clip's bundled BPE file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip is not installed: its BPE vocabulary is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / VOCAB_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: open_clip's BPE vocabulary is missing")
    return path


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (the ids' first 256 rows)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # the order of ids follows the printable bytes first, then the others
    return {b: table[b] for b in [*printable, *(b for b in range(256) if b not in printable)]}


def read_open_clip_merges(vocab_path: str | Path | None = None) -> list[str]:
    """CLIP's merge rules, "a b" per rule in rank order, as open_clip reads them."""
    path = Path(vocab_path) if vocab_path is not None else open_clip_vocab_path()
    return gzip.open(path).read().decode("utf-8").split("\n")[1 : N_MERGES + 1]


def _base_vocab() -> dict[str, int]:
    """The ids of the 512 one-byte symbols (alone, and ending a word) and the special tokens;
    merge rule i makes id 512 + i."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({t: 512 + N_MERGES + i for i, t in enumerate(SPECIAL_TOKENS)})
    return vocab


def build_bpe(merges: Sequence[str], ranks: Sequence[int] | None = None):
    """A `tokenizers.Tokenizer` for CLIP's byte-level BPE with open_clip's ids, over
    `merges` ("a b" rules in rank order; `ranks`: their positions in CLIP's full list, when
    only some are given). It expects words already split (see `ClipTokenizer`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ranks = range(len(merges)) if ranks is None else ranks
    pairs = [tuple(rule.split(" ")) for rule in merges]
    vocab = _base_vocab()
    vocab.update({a + b: 512 + rank for (a, b), rank in zip(pairs, ranks, strict=True)})
    bpe = models.BPE(
        vocab=vocab,
        merges=pairs,
        end_of_word_suffix="</w>",  # CLIP marks the last symbol of every word
        fuse_unk=False,
    )
    tokenizer = Tokenizer(bpe)
    # Each word's UTF-8 bytes become the printable characters of bytes_to_unicode; the
    # splitting itself happened before (use_regex=False).
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A literal "<start_of_text>" in a query is the special token in open_clip too.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


# open_clip's word pattern (SimpleTokenizer.pat), with the special tokens first.
_WORD_PATTERN = (
    "|".join(SPECIAL_TOKENS)
    + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def clean_lower(text: str) -> str:
    """open_clip's default cleaning (`_clean_lower`): ftfy, HTML entities twice, whitespace
    collapsed, lower case."""
    if not ftfy_is_identity(text):
        import ftfy  # ~0.1 s to import: only for text it could change

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).strip().lower()


def ftfy_is_identity(text: str) -> bool:
    """True for text `ftfy.fix_text` leaves as it is, up to line breaks (which become
    spaces anyway): printable ASCII, tabs and line breaks, and no `&` (ftfy unescapes HTML
    entities once more than open_clip's own two rounds). Every ftfy fix (mojibake, width,
    ligatures, C1 and other control characters, terminal escapes, NFC) needs another
    character to act on."""
    return "&" not in text and _PLAIN_ASCII.fullmatch(text) is not None


_PLAIN_ASCII = re.compile(r"[\t\n\r\x20-\x7e]*")


class ClipTokenizer:
    """Texts -> (N, context_length) int64 token ids, equal to open_clip's SimpleTokenizer.

    A text longer than the context is cut and its last id set to the end token, as open_clip
    does; the rest of a row is zeros.

    `one_shot`: for a process that tokenizes one query and exits. Building the BPE over all
    48,894 merge rules costs `tokenizers` ~0.2 s, a third of a cold search; instead each
    call then builds it over the rules that can apply to its words (a rule's result is
    always a substring of the word it forms, so rules whose result isn't one never fire),
    in the same rank order, which gives the same ids in ~20 ms. Repeated calls want the
    full table (built once, then ~0.05 ms a text).
    """

    def __init__(self, merges: Sequence[str], context_length: int = 77, *,
                 one_shot: bool = False):
        import regex

        self.merges = list(merges)
        self.context_length = int(context_length)
        self.one_shot = one_shot
        self.sot_id, self.eot_id = (_base_vocab()[t] for t in SPECIAL_TOKENS)
        self._words = regex.compile(_WORD_PATTERN, regex.IGNORECASE)
        self._full = None if one_shot else build_bpe(self.merges)
        self._byte_chars = bytes_to_unicode()
        self._results: list[str] | None = None  # merge i's result symbol, for pruning

    @classmethod
    def from_open_clip_vocab(cls, context_length: int = 77, **kwargs: Any) -> ClipTokenizer:
        return cls(read_open_clip_merges(), context_length, **kwargs)

    @classmethod
    def from_file(cls, path: str | Path, context_length: int, **kwargs: Any) -> ClipTokenizer:
        """Read merge rules written by `save`."""
        merges = Path(path).read_text(encoding="utf-8").split("\n")
        if len(merges) != N_MERGES or not all(rule.count(" ") == 1 for rule in merges):
            raise ValueError(f"{path}: not {N_MERGES} BPE merge rules")
        return cls(merges, context_length, **kwargs)

    def save(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(self.merges), encoding="utf-8")

    def encode(self, text: str) -> list[int]:
        """The BPE ids of one text, without start and end tokens."""
        words = self._words.findall(clean_lower(text))
        if not words:
            return []
        bpe = self._full if self._full is not None else self._bpe_for(words)
        return bpe.encode(words, is_pretokenized=True, add_special_tokens=False).ids

    def _bpe_for(self, words: list[str]):
        """A BPE over only the merge rules that can fire in `words` (see the class notes)."""
        if self._results is None:
            self._results = [rule.replace(" ", "") for rule in self.merges]
        # the words as the BPE sees them: byte-level characters, "</w>" closing each word
        chars = self._byte_chars
        haystack = "\0".join(
            "".join(chars[b] for b in word.encode("utf-8")) + "</w>" for word in words
        )
        keep = [i for i, result in enumerate(self._results) if result in haystack]
        return build_bpe([self.merges[i] for i in keep], keep)

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out


def open_clip_tokenizer_supported(tokenizer: Any) -> str | None:
    """None when `tokenizer` (an open_clip tokenizer object) is the one ClipTokenizer
    reproduces, else why not, in a few words."""
    cls = type(tokenizer)
    if cls.__name__ != "SimpleTokenizer" or not cls.__module__.startswith("open_clip"):
        return f"its tokenizer is {cls.__name__}, not CLIP's BPE"
    clean = getattr(getattr(tokenizer, "clean_fn", None), "__name__", None)
    if clean != "_clean_lower":
        return f"its tokenizer cleans text with {clean}, not the default lower-casing"
    if getattr(tokenizer, "reduction_fn", None) is not None:
        return "its tokenizer reduces long texts instead of cutting them"
    if getattr(tokenizer, "vocab_size", None) != VOCAB_SIZE:
        return "its tokenizer has extra special tokens"
    return None

