"""Meta's Llama 3 tokenizer: byte-level BPE run by tiktoken.

This mirrors ``llama_models/llama3/tokenizer.py`` from Meta's llama-models repository
token for token: the same pre-tokenisation regex, the same 256 special tokens starting at
id 128000 (``<|image|>`` at 128011, as in Meta's current tokenizer), the same defaults for
special-token handling and the same chunking of long inputs. On top of Meta's class it
adds what a vision model needs at the token level:

* ``image_token_id`` (128256): the id the *model* sees for an image. Meta's chat format
  rewrites ``<|image|>`` (128011) to 128256, the first row of the small learnable
  embedding table that sits after the frozen 128256-row text embedding; transformers'
  Mllama tokenizer emits 128256 directly. ``decode`` maps every learnable-table id back
  to ``"<|image|>"``.
* a strict ``.model`` file reader (see :func:`load_bpe_ranks`).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from pathlib import Path
from typing import AbstractSet, Collection, Iterable, Iterator, Literal, Sequence

import tiktoken

# tiktoken can encode at most ~400k characters per call without a pyo3 panic.
TIKTOKEN_MAX_ENCODE_CHARS = 400_000
# tiktoken's regex pre-tokeniser also panics/slows down on very long runs of consecutive
# whitespace or non-whitespace characters (openai/tiktoken#195): Meta cuts such runs.
MAX_NO_WHITESPACES_CHARS = 25_000

# Llama 3's pre-tokenisation regex (identical to Meta's ``Tokenizer.pat_str``).
LLAMA3_PAT_STR = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The named special tokens, in id order after the base vocabulary. Shared with the
# SentencePiece tokenizer so both put each special at the same offset from their base.
LLAMA3_NAMED_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",  # end of message (the model expects a tool result next)
    "<|eot_id|>",  # end of turn
    "<|python_tag|>",
    "<|image|>",
)
NUM_RESERVED_SPECIAL_TOKENS = 256
IMAGE_TOKEN = "<|image|>"
# Meta's vision model embeds ids >= n_words with a separate learnable table of 8 rows;
# row 0 is the image token, the other rows are unused but valid model inputs.
NUM_LEARNABLE_EMBEDDINGS = 8

AllowedSpecial = Literal["all"] | AbstractSet[str] | None
DisallowedSpecial = Literal["all"] | Collection[str]


def llama3_special_tokens(num_base_tokens: int) -> dict[str, int]:
    """Meta's full table of 256 special tokens, numbered from ``num_base_tokens``."""
    names = list(LLAMA3_NAMED_SPECIAL_TOKENS)
    names += [
        f"<|reserved_special_token_{2 + i}|>"
        for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(LLAMA3_NAMED_SPECIAL_TOKENS))
    ]
    return {name: num_base_tokens + i for i, name in enumerate(names)}


def load_bpe_ranks(model_path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file: one ``<base64 token> <rank>`` pair per line.

    Same format as ``tiktoken.load.load_tiktoken_bpe``, read directly because that
    function caches file contents under a key derived from the *path* only (in
    ``$TMPDIR/data-gym-cache``): a file rewritten at the same path would silently load
    stale ranks. Unlike Meta's ``load_bpe_file`` (which logs and skips bad lines) a
    malformed line is an error: a skipped merge would silently change tokenisation.
    """
    path = Path(model_path)
    try:
        text = path.read_bytes().decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a tiktoken BPE file (not ASCII text)") from e

    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token_b64, rank_str = line.split()
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank_str)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{path}:{line_no}: malformed tiktoken BPE line {line[:80]!r}") from e
        if token in ranks:
            raise ValueError(f"{path}:{line_no}: duplicate token {token!r}")
        ranks[token] = rank
    if not ranks:
        raise ValueError(f"{path} is not a tiktoken BPE file (no token lines)")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: BPE ranks are not exactly 0..{len(ranks) - 1}")
    return ranks


# A run longer than ``n`` of whitespace or of non-whitespace. The look-behinds make the
# match start only at the beginning of a run, keeping the scan linear in the text length.
_LONG_RUN_PATTERNS: dict[int, re.Pattern[str]] = {}


def _long_run_pattern(n: int) -> re.Pattern[str]:
    if n not in _LONG_RUN_PATTERNS:
        _LONG_RUN_PATTERNS[n] = re.compile(rf"(?<!\s)\s{{{n + 1},}}|(?<!\S)\S{{{n + 1},}}")
    return _LONG_RUN_PATTERNS[n]


def split_whitespaces_or_nonwhitespaces(s: str, max_consecutive_slice_len: int) -> Iterator[str]:
    """Split ``s`` so no piece holds more than ``max_consecutive_slice_len`` consecutive
    whitespace or consecutive non-whitespace characters.

    Yields exactly the pieces of Meta's ``Tokenizer._split_whitespaces_or_nonwhitespaces``
    (a run of length L is cut after every ``max`` characters counted from the run start;
    the last piece is always yielded, even when empty), computed with one C-level regex
    scan instead of a Python loop over every character. ``\\s`` in ``re`` and
    ``str.isspace`` agree on every code point, so runs are the same as Meta's.
    """
    n = max_consecutive_slice_len
    start = 0
    for run in _long_run_pattern(n).finditer(s):
        # cuts at run_start + k*n for k >= 1, strictly inside the run
        for cut in range(run.start() + n, run.end(), n):
            yield s[start:cut]
            start = cut
    yield s[start:]



def set_special_ids(tok) -> None:
    """The named special ids every tokenizer of ours exposes (from `tok.special_tokens` and
    `tok.n_words`). `image_token_id` is the id the MODEL sees for an image: n_words, row 0
    of the learnable embedding table (Meta's chat format rewrites <|image|> to it)."""
    tok.bos_id = tok.special_tokens["<|begin_of_text|>"]
    tok.eos_id = tok.special_tokens["<|end_of_text|>"]
    tok.eot_id = tok.special_tokens["<|eot_id|>"]
    tok.eom_id = tok.special_tokens["<|eom_id|>"]
    tok.python_tag_id = tok.special_tokens["<|python_tag|>"]
    tok.pad_id = tok.special_tokens["<|finetune_right_pad_id|>"]
    tok.stop_tokens = [tok.eos_id, tok.eom_id, tok.eot_id]
    tok.image_special_token_id = tok.special_tokens[IMAGE_TOKEN]
    tok.image_token_id = tok.n_words

class Tokenizer:
    """Llama 3 tiktoken tokenizer (Meta's class plus the model-side image id).

    Attributes: ``n_words`` (128256), ``special_tokens`` (name -> id), ``bos_id``,
    ``eos_id``, ``eot_id``, ``eom_id``, ``pad_id`` (``<|finetune_right_pad_id|>``),
    ``python_tag_id``, ``stop_tokens`` (Meta's order: eos, eom, eot),
    ``image_special_token_id`` (128011, ``<|image|>`` in the file's special table) and
    ``image_token_id`` (128256, the id the model embeds for an image).
    """

    pat_str = LLAMA3_PAT_STR
    num_reserved_special_tokens = NUM_RESERVED_SPECIAL_TOKENS

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer model file not found: {path}")
        self.model_path = path

        mergeable_ranks = load_bpe_ranks(path)
        num_base_tokens = len(mergeable_ranks)
        self.special_tokens: dict[str, int] = llama3_special_tokens(num_base_tokens)
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=self.pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
        )

        self.n_words: int = num_base_tokens + len(self.special_tokens)
        set_special_ids(self)

    # ------------------------------------------------------------------ encoding
    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Encode ``s`` to token ids, optionally framed by ``bos_id`` / ``eos_id``.

        Special-token strings in ``s`` are plain text unless named in
        ``allowed_special`` (a set of token strings, or ``"all"``); with Meta's defaults
        (nothing allowed, nothing disallowed) ``"<|eot_id|>"`` in user text becomes
        ordinary tokens, never 128009, and nothing raises. Strings in
        ``disallowed_special`` (or ``"all"`` of the not-allowed ones) raise ``ValueError``.
        ``"<|image|>"`` allowed as special encodes to 128011 as in Meta's tokenizer;
        :meth:`to_model_ids` turns it into the model's ``image_token_id``.

        Lone surrogates (not encodable as UTF-8) are replaced with U+FFFD by tiktoken.
        Long inputs are cut exactly like Meta's (400k-character chunks, runs of more than
        25k whitespace / non-whitespace characters split) so ids match Meta's for any text.
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() expects str, got {type(s).__name__}")
        if allowed_special is None:
            allowed_special = set()

        t: list[int] = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for substr in split_whitespaces_or_nonwhitespaces(
                s[i : i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS
            ):
                t.extend(
                    self.model.encode(
                        substr, allowed_special=allowed_special, disallowed_special=disallowed_special
                    )
                )
        if bos:
            t.insert(0, self.bos_id)
        if eos:
            t.append(self.eos_id)
        return t

    def to_model_ids(self, ids: Iterable[int]) -> list[int]:
        """Rewrite ``<|image|>`` (128011) to ``image_token_id`` (128256), as Meta's chat
        format does before the model; every other id is unchanged."""
        return [self.image_token_id if i == self.image_special_token_id else int(i) for i in ids]

    # ------------------------------------------------------------------ decoding
    def _to_file_ids(self, ids: Iterable[int]) -> list[int]:
        """Validate ids and map the learnable-table ids back to ``<|image|>`` (128011)."""
        out = []
        limit = self.n_words + NUM_LEARNABLE_EMBEDDINGS
        for raw in ids:
            i = int(raw)
            if i >= self.n_words:
                if i >= limit:
                    raise ValueError(f"token id {i} is out of range (vocabulary has {limit} ids)")
                i = self.image_special_token_id
            elif i < 0:
                raise ValueError(f"token id {i} is negative")
            out.append(i)
        return out

    def decode(self, t: Sequence[int]) -> str:
        """Decode ids to text. Special ids decode to their names; ids of the learnable
        table (``image_token_id`` .. ``n_words + 7``) decode to ``"<|image|>"``. Byte
        sequences that are not valid UTF-8 (e.g. a cut multi-byte character) become U+FFFD.
        """
        return self.model.decode(self._to_file_ids(t))

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes of one token (for streaming detokenisation of partial UTF-8)."""
        return self.model.decode_single_token_bytes(self._to_file_ids([token_id])[0])

    def token_to_piece(self, token_id: int) -> str:
        """One token as text (U+FFFD where the token holds part of a UTF-8 character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    decode_token = token_to_piece

    def __repr__(self) -> str:
        return f"Tokenizer(tiktoken, n_words={self.n_words}, path={str(self.model_path)!r})"
