"""A SentencePiece model behind the Llama 3 tokenizer interface.

Used for trunks that ship a SentencePiece ``tokenizer.model`` and for the tiny CPU demo,
whose vocabulary we train ourselves with :func:`train_sentencepiece`.

Id layout: the SentencePiece pieces keep their ids ``0 .. sp_size - 1``; Llama 3's named
special tokens (``<|begin_of_text|>`` ... ``<|image|>``, the first twelve of Meta's table)
follow at ``sp_size + k``, in Meta's order, so every special has the same offset from the
base vocabulary as in Llama 3. ``n_words = sp_size + 12`` and, as with Llama 3, the model
sees an image as ``image_token_id = n_words`` (row 0 of the learnable embedding table).

Round trips (``decode(encode(s)) == s``) and their limits:

* models written by :func:`train_sentencepiece` use the identity normaliser, no dummy
  prefix, no whitespace squeezing and byte fallback, so any text round-trips exactly,
  except that U+2581 (``▁``, SentencePiece's internal stand-in for a space) decodes as
  a space: it cannot be told apart from one;
* other models keep their own normalisation: NFKC folding (e.g. ``ﬁ`` -> ``fi``),
  collapsed whitespace, or a dummy prefix (Llama 2 style: a leading space added to each
  text segment, dropped again on decode) make round trips lossy for such text;
* a ``"word"`` model has no merges: words it never saw in training fall back to bytes.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from .tiktoken_tokenizer import (
    set_special_ids,
    IMAGE_TOKEN,
    LLAMA3_NAMED_SPECIAL_TOKENS,
    NUM_LEARNABLE_EMBEDDINGS,
    AllowedSpecial,
    DisallowedSpecial,
)

SP_SPACE = "\u2581"  # SentencePiece's whitespace marker "▁"
SP_MODEL_TYPES = ("bpe", "unigram", "word", "char")


class SentencePieceTokenizer:
    """SentencePiece tokenizer with Llama 3 special tokens appended after its pieces.

    Same interface and attributes as the tiktoken :class:`Tokenizer`: ``n_words``,
    ``special_tokens``, ``bos_id``, ``eos_id``, ``eot_id``, ``eom_id``, ``pad_id``,
    ``python_tag_id``, ``stop_tokens``, ``image_special_token_id``, ``image_token_id``,
    ``encode``, ``decode``, ``to_model_ids``, ``token_bytes``, ``token_to_piece``.
    The SentencePiece model's own ``<s>``/``</s>`` pieces (if any) are not used.
    """

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"Tokenizer model file not found: {path}")
        self.model_path = path
        self.sp = spm.SentencePieceProcessor()
        try:
            # Load from bytes: sentencepiece's own file reader cannot open every path
            # (non-ASCII paths on some platforms) and its errors omit the file name.
            self.sp.LoadFromSerializedProto(path.read_bytes())
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{path} is not a readable SentencePiece model: {e}") from e

        self.sp_size: int = self.sp.get_piece_size()
        self.special_tokens: dict[str, int] = {
            name: self.sp_size + k for k, name in enumerate(LLAMA3_NAMED_SPECIAL_TOKENS)
        }
        self._special_names: dict[int, str] = {i: n for n, i in self.special_tokens.items()}
        self.n_words: int = self.sp_size + len(self.special_tokens)
        set_special_ids(self)

    # ------------------------------------------------------------------ encoding
    def _special_sets(
        self, allowed_special: AllowedSpecial, disallowed_special: DisallowedSpecial
    ) -> tuple[set[str], set[str]]:
        """Resolve the tiktoken-style arguments into (allowed, disallowed) name sets."""
        names = set(self.special_tokens)
        if allowed_special is None:
            allowed = set()
        elif allowed_special == "all":
            allowed = names
        else:
            allowed = set(allowed_special) & names
        if disallowed_special == "all":
            disallowed = names - allowed
        else:
            disallowed = set(disallowed_special) & names
        return allowed, disallowed

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: AllowedSpecial = None,
        disallowed_special: DisallowedSpecial = (),
    ) -> list[int]:
        """Encode ``s``; same contract as the tiktoken :meth:`Tokenizer.encode`.

        Occurrences of allowed special-token strings become their ids; the text between
        them is encoded by SentencePiece piece by piece. Every other special string is
        plain text, unless disallowed, which raises ``ValueError`` (as tiktoken does).
        """
        if not isinstance(s, str):
            raise TypeError(f"encode() expects str, got {type(s).__name__}")
        allowed, disallowed = self._special_sets(allowed_special, disallowed_special)
        if disallowed:
            hit = re.search("|".join(map(re.escape, sorted(disallowed))), s)
            if hit:
                raise ValueError(
                    f"Encountered text corresponding to disallowed special token {hit.group()!r}; "
                    "pass it in allowed_special to encode it as a special token, or remove it "
                    "from disallowed_special to encode it as plain text"
                )

        ids: list[int] = [self.bos_id] if bos else []
        if allowed:
            # A capturing split keeps the special strings at the odd positions.
            parts = re.split("(" + "|".join(map(re.escape, sorted(allowed))) + ")", s)
        else:
            parts = [s]
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part, out_type=int))
        if eos:
            ids.append(self.eos_id)
        return ids

    def to_model_ids(self, ids: Iterable[int]) -> list[int]:
        """Rewrite ``<|image|>`` to ``image_token_id`` (the learnable row the model embeds)."""
        return [self.image_token_id if i == self.image_special_token_id else int(i) for i in ids]

    # ------------------------------------------------------------------ decoding
    def _piece_text(self, token_id: int) -> str | None:
        """Text of a special or learnable-table id, ``None`` for SentencePiece ids."""
        if token_id < 0 or token_id >= self.n_words + NUM_LEARNABLE_EMBEDDINGS:
            raise ValueError(
                f"token id {token_id} is out of range "
                f"(vocabulary has {self.n_words + NUM_LEARNABLE_EMBEDDINGS} ids)"
            )
        if token_id >= self.n_words:
            return IMAGE_TOKEN
        return self._special_names.get(token_id)

    def _decode_sp(self, ids: list[int]) -> str:
        # Contiguous SentencePiece ids are decoded together so byte-fallback pieces
        # combine into characters. Left-over "▁" (from a byte-fallback "▁", which word
        # models emit for unseen words) is a space, like every other "▁" SentencePiece
        # decodes: spaces and literal U+2581 are indistinguishable in its vocabulary.
        return self.sp.decode(ids).replace(SP_SPACE, " ") if ids else ""

    def decode(self, t: Sequence[int]) -> str:
        """Decode ids to text; specials decode to their names, learnable-table ids
        (``image_token_id`` .. ``n_words + 7``) to ``"<|image|>"``."""
        out: list[str] = []
        run: list[int] = []
        for raw in t:
            i = int(raw)
            special = self._piece_text(i)
            if special is None:
                run.append(i)
                continue
            out.append(self._decode_sp(run))
            run = []
            out.append(special)
        out.append(self._decode_sp(run))
        return "".join(out)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one token: a byte-fallback piece ``<0xAB>`` is the single byte."""
        token_id = int(token_id)
        special = self._piece_text(token_id)
        if special is not None:
            return special.encode("utf-8")
        if self.sp.is_byte(token_id):
            return bytes([int(self.sp.id_to_piece(token_id)[1:-1], 16)])
        if self.sp.is_control(token_id):
            return b""
        return self.sp.id_to_piece(token_id).replace(SP_SPACE, " ").encode("utf-8")

    def token_to_piece(self, token_id: int) -> str:
        """One token as text (U+FFFD where the token is part of a UTF-8 character)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    decode_token = token_to_piece

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(n_words={self.n_words}, path={str(self.model_path)!r})"


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    vocab_size: int,
    model_type: str = "bpe",
) -> Path:
    """Train a small SentencePiece model on ``texts`` and write it to ``out_path``.

    Settings are chosen for exact round trips (see the module docstring): identity
    normalisation, no dummy prefix, whitespace kept as is, full character coverage and
    byte fallback (256 byte pieces, so ``vocab_size`` must exceed 256 plus the number
    of distinct characters). ``vocab_size`` is an upper bound: a corpus too small for it
    yields a smaller vocabulary instead of an error. SentencePiece's own bos/eos/pad
    pieces are disabled, only ``<unk>`` (id 0) is kept: the Llama 3 specials are added
    by :class:`SentencePieceTokenizer`. The file is written to a temporary file and
    moved into place, so readers never see a partial model. Returns the path.
    """
    if model_type not in SP_MODEL_TYPES:
        raise ValueError(f"unknown SentencePiece model_type {model_type!r}; expected one of {SP_MODEL_TYPES}")
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")

    out = Path(out_path)
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=buf,
            vocab_size=int(vocab_size),
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            hard_vocab_limit=False,
            max_sentence_length=1 << 20,  # the default (4192 bytes) silently drops longer texts
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            pad_id=-1,
            minloglevel=2,  # the trainer is very chatty on stderr
        )
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed for {out}: {e}") from e

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    try:
        os.chmod(fd, 0o644)  # mkstemp creates 0600; a model file is not a secret
        with os.fdopen(fd, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
