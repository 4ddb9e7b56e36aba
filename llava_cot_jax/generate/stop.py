"""Stop strings matched on the byte suffix of generated text, inside a jitted decode loop.

A closing tag such as ``</CAPTION>`` can be spelled by many token sequences (``</``+``CAPTION``+``>``,
``</CAP``+``TION>``, ``.</``+...). Rather than enumerate them, every token's bytes are tabulated once,
and each decode step keeps a short rolling window of the last bytes each row produced. A stop string
fires on the token whose bytes complete it, whatever the tokenisation:

* a match that spans tokens ends inside the new token's first ``H`` bytes (``H`` ≥ the longest stop
  string), so the window (last ``H`` bytes so far) plus the token's head is enough to see it;
* a match wholly inside one (possibly very long) token is precomputed per token (``contains``).

Special tokens contribute no bytes (``skip_special_tokens`` semantics), so EOS/header tokens neither
match nor break a match. Nothing is ever decoded on the host during generation.

A stop string given as ``TextEnd(s)`` fires only on a token after which the generated text *ends* with ``s``
(LLaVA-CoT's sentence baseline stops when the text ends with a period; a token such as ``".\n\n"`` does not
end a sentence there, while a plain ``"."`` stop fires on it).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes→printable-unicode map used by byte-level BPE vocabularies (Llama 3)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


def token_bytes(tokenizer) -> list[bytes]:
    """The bytes each token id contributes to decoded text; b"" for special tokens.

    Byte-level BPE vocabularies (Llama 3) are mapped back to raw bytes exactly (a token may be half a UTF-8
    character); SentencePiece vocabularies (Llama 2, LLaVA-1.5) too, `▁` being a space and `<0xNN>` the byte NN
    (decoding a `▁word` id alone would drop its space); other tokenizers fall back to decoding each id alone.
    """
    vocab_size = len(tokenizer)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tok_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(tok_id)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    decoder = _byte_decoder()
    byte_level = all(p is None or i in special or all(ch in decoder for ch in p) for i, p in enumerate(pieces))
    sentencepiece = not byte_level and any(p and "\u2581" in p for p in pieces)
    out = []
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            out.append(b"")
        elif byte_level:
            out.append(bytes(decoder[ch] for ch in piece))
        elif sentencepiece:
            byte = _BYTE_PIECE.fullmatch(piece)
            out.append(bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8"))
        else:
            out.append(tokenizer.decode([i]).encode("utf-8"))
    return out


class TextEnd(str):
    """A stop string that counts only where the generated text ends with it (not merely contains it).

    It compares unequal to the plain string, so stop sets that differ only in this way are different keys (the
    sampler caches one table per set)."""

    def __eq__(self, other) -> bool:
        return isinstance(other, TextEnd) and str.__eq__(self, other)

    def __ne__(self, other) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash((TextEnd, str(self)))

    def __repr__(self) -> str:
        return f"TextEnd({str.__repr__(self)})"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StopTable:
    """Device arrays describing a set of stop strings over a vocabulary.

    head: [V, H] uint8, the first H bytes of each token (zero padded); tok_len: [V] int32 byte lengths;
    tail: [V, H] uint8, the last H bytes of each token (right aligned); contains: [V, S] bool, token holds stop s;
    stops: [S, H] uint8 (left aligned); stops_right: [S, H] uint8 (right aligned); stop_len: [S] int32 (0 = unused
    slot); at_end: [S] bool, the stop counts only at the end of the text (`TextEnd`).
    """

    head: jax.Array
    tail: jax.Array
    tok_len: jax.Array
    contains: jax.Array
    stops: jax.Array
    stops_right: jax.Array
    stop_len: jax.Array
    at_end: jax.Array

    @property
    def window(self) -> int:
        return self.head.shape[1]

    @property
    def num_stops(self) -> int:
        return self.stops.shape[0]


def build_stop_table(
    vocab_bytes: Sequence[bytes], stop_strings: Sequence[str], window: int | None = None, num_slots: int | None = None
) -> StopTable:
    """Tabulates ``vocab_bytes`` against ``stop_strings``.

    ``window`` (H) and ``num_slots`` (S) can be fixed so that tables for different stop sets share one
    compiled decode loop; unused slots never match.
    """
    encoded = [s.encode("utf-8") for s in stop_strings]
    if any(len(s) == 0 for s in encoded):
        raise ValueError("stop strings must be non-empty")
    longest = max([len(s) for s in encoded], default=1)
    window = window or max(8, 1 << (longest - 1).bit_length())
    if longest > window:
        raise ValueError(f"stop string of {longest} bytes exceeds the window of {window}")
    num_slots = num_slots or max(1, len(encoded))
    if len(encoded) > num_slots:
        raise ValueError(f"{len(encoded)} stop strings exceed {num_slots} slots")

    vocab = len(vocab_bytes)
    head = np.zeros((vocab, window), np.uint8)
    tail = np.zeros((vocab, window), np.uint8)
    tok_len = np.zeros((vocab,), np.int32)
    contains = np.zeros((vocab, num_slots), bool)
    for i, b in enumerate(vocab_bytes):
        tok_len[i] = len(b)
        h = b[:window]
        head[i, : len(h)] = np.frombuffer(h, np.uint8)
        t = b[-window:] if b else b""
        tail[i, window - len(t) :] = np.frombuffer(t, np.uint8)
        for s, stop in enumerate(encoded):
            contains[i, s] = stop in b
    stops = np.zeros((num_slots, window), np.uint8)
    stops_right = np.zeros((num_slots, window), np.uint8)
    stop_len = np.zeros((num_slots,), np.int32)
    at_end = np.zeros((num_slots,), bool)
    for s, stop in enumerate(encoded):
        stops[s, : len(stop)] = np.frombuffer(stop, np.uint8)
        stops_right[s, window - len(stop) :] = np.frombuffer(stop, np.uint8)
        stop_len[s] = len(stop)
        at_end[s] = isinstance(stop_strings[s], TextEnd)
    arrays = (head, tail, tok_len, contains, stops, stops_right, stop_len, at_end)
    return StopTable(*(jnp.asarray(a) for a in arrays))


def init_window(batch: int, table: StopTable) -> tuple[jax.Array, jax.Array]:
    """Empty rolling windows: bytes [B, H] (right aligned) and how many of them are real [B]."""
    return jnp.zeros((batch, table.window), jnp.uint8), jnp.zeros((batch,), jnp.int32)


def step(table: StopTable, window: jax.Array, filled: jax.Array, tokens: jax.Array):
    """Appends ``tokens`` [B] to the windows; returns (window, filled, hit [B, S] bool).

    hit[b, s] is true when stop string s ends within the bytes of this token (or lies inside it).
    """
    h = table.window
    n = table.tok_len[tokens]  # [B]
    head = table.head[tokens]  # [B, H]
    buf = jnp.concatenate([window, head], axis=1)  # [B, 2H]: old window | new token head

    # Compare every start offset p against every stop string: eq[b, s, p] = buf[b, p:p+len_s] == stop_s.
    offsets = jnp.arange(h + 1)  # starts 0..H (a start at H is wholly inside the token: `contains` covers it)
    idx = offsets[:, None] + jnp.arange(h)[None, :]  # [P, H]
    windows = buf[:, jnp.minimum(idx, 2 * h - 1)]  # [B, P, H]
    char_ok = (windows[:, None] == table.stops[None, :, None, :]) | (jnp.arange(h) >= table.stop_len[:, None])[
        None, :, None, :
    ]
    eq = jnp.all(char_ok, axis=-1)  # [B, S, P]
    end = offsets[None, None, :] + table.stop_len[None, :, None]  # exclusive end of the match in buf
    spans_boundary = (
        (offsets[None, None, :] >= h - filled[:, None, None])  # starts on real bytes of the window
        & (offsets[None, None, :] < h)  # ...not inside the token (that case is `contains`)
        & (end > h)
        & (end <= h + jnp.minimum(n, h)[:, None, None])  # ends on real bytes of the token
    )
    hit = jnp.any(eq & spans_boundary & (table.stop_len > 0)[None, :, None], axis=-1)
    hit = hit | table.contains[tokens]

    # New window = last H bytes of (old window ++ token). Short tokens shift the buffer; long ones are their tail.
    shifted = jnp.take_along_axis(buf, jnp.minimum(n, h)[:, None] + jnp.arange(h)[None, :], axis=1)
    new_window = jnp.where((n >= h)[:, None], table.tail[tokens], shifted)
    new_filled = jnp.minimum(filled + n, h)

    # TextEnd stops: the text now ends with the stop (a token adding no bytes cannot newly end the text with it).
    in_tail = jnp.arange(h)[None, :] >= h - table.stop_len[:, None]  # [S, H]
    tail_eq = jnp.all((new_window[:, None, :] == table.stops_right[None]) | ~in_tail[None], axis=-1)  # [B, S]
    ends_with = tail_eq & (new_filled[:, None] >= table.stop_len[None, :]) & (n > 0)[:, None] & (table.stop_len > 0)
    hit = jnp.where(table.at_end[None, :], ends_with, hit)
    return new_window, new_filled, hit
