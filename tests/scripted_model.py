"""A scripted stand-in for the model: its replies are predetermined text, produced through the real sampler.

`ScriptedModel(tokenizer, reply_for)` has the methods the sampler calls (`init_cache`, `forward_cached`) and
a config shaped like the tiny model's. Its "cache" stores the token ids written so far; at every step a host
callback decodes the row's prompt (everything up to the last `<|end_header_id|>`), asks
`reply_for(prompt_text)` for the whole reply, and puts all probability on the reply's next token (EOS once it
is complete). So prefill, judge-prefix reuse, the while-loop decode, stop strings, budgets and EOS all run
for real; only the choice of token is scripted. Text only (no images).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llava_cot_jax.data import chat
from llava_cot_jax.models.mllama.config import MllamaConfig

# reply functions by script id: a jitted program keys on the model's graph, which holds only the id
_SCRIPTS: dict[int, tuple[object, Callable[[str], str]]] = {}


class ScriptedModel(nnx.Module):
    cross_attends_images = True  # it reads the image context at every step, as Mllama does

    def __init__(self, tokenizer, reply_for: Callable[[str], str]):
        self.config = MllamaConfig.tiny(vocab_size=len(tokenizer) - 1, scan_layers=False)
        self.unused = nnx.Param(jnp.zeros(()))  # the sampler splits parameters; there are none to speak of
        self.script_id = len(_SCRIPTS)
        _SCRIPTS[self.script_id] = (tokenizer, reply_for)

    def set_script(self, reply_for: Callable[[str], str]) -> None:
        """Replaces the replies without changing the graph (no recompilation)."""
        _SCRIPTS[self.script_id] = (_SCRIPTS[self.script_id][0], reply_for)

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> dict:
        return {"tokens": jnp.zeros((batch_size, 1, max_len, 1), jnp.int32)}  # rows 4 axes from the end

    def forward_cached(
        self, input_ids, positions, cache, cache_index, key_valid, cross_kv=None, cross_attention_mask=None
    ):
        if cross_kv is not None:
            raise NotImplementedError("the scripted model is text only")
        b, s = input_ids.shape
        tokens = jax.lax.dynamic_update_slice(
            cache["tokens"], input_ids[:, None, :, None].astype(jnp.int32), (0, 0, cache_index, 0)
        )
        next_ids = jax.pure_callback(
            functools.partial(_next_tokens, self.script_id),
            jax.ShapeDtypeStruct((b,), jnp.int32),
            tokens[:, 0, :, 0],
            key_valid,
            cache_index + s,
        )
        vocab = self.config.text.vocab_size
        logits = jnp.where(jnp.arange(vocab)[None, :] == next_ids[:, None], 0.0, -1e9).astype(jnp.float32)
        return jnp.broadcast_to(logits[:, None, :], (b, s, vocab)), {"tokens": tokens}


@functools.lru_cache(maxsize=1024)
def _reply_ids(tokenizer, reply_for: Callable[[str], str], prompt: tuple[int, ...]) -> tuple[int, ...]:
    # the prompt ends with the assistant header; its "\n\n" is tokenised together with the reply's start
    reply = reply_for(tokenizer.decode(list(prompt)))
    return tuple(tokenizer("\n\n" + reply, add_special_tokens=False)["input_ids"])


def _next_tokens(script_id: int, tokens, valid, upto) -> np.ndarray:
    tokens, valid, upto = np.asarray(tokens), np.asarray(valid), int(upto)  # callbacks get jax arrays
    tokenizer, reply_for = _SCRIPTS[script_id]
    header = tokenizer.convert_tokens_to_ids(chat.END_HEADER)
    out = np.full(tokens.shape[0], tokenizer.convert_tokens_to_ids(chat.EOT), np.int32)
    for row in range(tokens.shape[0]):
        history = tokens[row, :upto][valid[row, :upto]]
        ends = np.flatnonzero(history == header)
        if not len(ends):
            continue
        prompt, written = tuple(int(t) for t in history[: ends[-1] + 1]), history[ends[-1] + 1 :]
        reply = _reply_ids(tokenizer, reply_for, prompt)
        if len(written) < len(reply):
            out[row] = reply[len(written)]
    return out
