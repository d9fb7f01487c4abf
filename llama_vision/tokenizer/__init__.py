"""Tokenizers and the Llama 3.2 Vision chat format.

* :class:`Tokenizer`: Meta's Llama 3 tiktoken tokenizer (128256 ids + image id 128256).
* :class:`SentencePieceTokenizer`: the same interface over a SentencePiece model.
* :func:`train_sentencepiece`: train a small SentencePiece model (tiny demo, tests).
* :func:`load_tokenizer`: open either kind from a ``tokenizer.model`` file or its folder.
* :class:`ChatFormat`: dialogs -> token ids (and assistant loss masks), as Meta does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .chat_format import ChatFormat
from .sentencepiece_tokenizer import SentencePieceTokenizer, train_sentencepiece
from .tiktoken_tokenizer import Tokenizer

__all__ = [
    "ChatFormat",
    "SentencePieceTokenizer",
    "Tokenizer",
    "load_tokenizer",
    "train_sentencepiece",
]

TOKENIZER_FILENAME = "tokenizer.model"

# First line of a tiktoken BPE file: "<base64 token> <rank>". A SentencePiece model is a
# protobuf whose first byte is 0x0A (field 1, the piece list), never base64 text.
_TIKTOKEN_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | SentencePieceTokenizer:
    """Open a tokenizer from a ``tokenizer.model`` file, or a directory holding one.

    The format is detected from the content, not the name: a tiktoken BPE file (Llama 3;
    text lines ``<base64> <rank>``) gives a :class:`Tokenizer`, anything else is tried as
    a SentencePiece protobuf. Raises ``FileNotFoundError`` when the file is missing and
    ``ValueError`` when it is unreadable or in neither format; both name the path.
    """
    p = Path(path)
    if p.is_dir():
        p = p / TOKENIZER_FILENAME
    if not p.is_file():
        raise FileNotFoundError(f"Tokenizer model file not found: {p}")
    try:
        with open(p, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise ValueError(f"Cannot read tokenizer model file {p}: {e}") from e

    first_line = head.split(b"\n", 1)[0]
    if _TIKTOKEN_LINE.fullmatch(first_line):
        return Tokenizer(p)
    try:
        return SentencePieceTokenizer(p)
    except ValueError as e:
        raise ValueError(
            f"Unknown tokenizer format in {p}: neither a tiktoken BPE file nor a SentencePiece model"
        ) from e
