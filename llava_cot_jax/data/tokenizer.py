"""Llama-3-style tokenizers that need no model hub.

* `build_tiny_tokenizer()` — a small byte-level BPE vocabulary trained (deterministically, offline) on an
  embedded English text, followed by the 256 Llama-3 special tokens in Llama 3's id order and `<|image|>`.
  With `num_base_tokens=N` the ids are: text 0..N-1, `<|begin_of_text|>` N, ..., `<|eot_id|>` N+9, ...,
  `<|image|>` N+256. Text vocabulary size (the model's `vocab_size`, the rows of `lm_head`) is N+256 and the
  image token id equals it, as in Mllama where `<|image|>` is the first of the 8 extra embedding rows.
* `build_llama3_tokenizer()` — the true Llama-3.2-Vision tokenizer, rebuilt from the Llama 3 ranks that the
  MIT-licensed `quicktok-v1` package ships. For tests only (quicktok and tiktoken are test extras).

Both add `<|begin_of_text|>` on `add_special_tokens=True`, like the real Llama-3.2-Vision tokenizer.
"""

from __future__ import annotations

import base64
import functools
import os
import struct
import tempfile

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from llava_cot_jax.data import chat

# Llama 3's pre-tokenisation pattern (splits contractions, words, up to 3 digits, punctuation, whitespace).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_NUM_BASE_TOKENS = 128000
DEFAULT_TINY_BASE_TOKENS = 768


def llama3_special_tokens() -> list[str]:
    """The 256 Llama-3 special tokens in id order (offset 0 is id 128000 in the real vocabulary)."""
    named = {
        0: chat.BOS,
        1: chat.END_OF_TEXT,
        4: chat.PAD,
        6: chat.START_HEADER,
        7: chat.END_HEADER,
        8: chat.EOM,
        9: chat.EOT,
        10: chat.PYTHON_TAG,
    }
    tokens, reserved = [], 0
    for offset in range(256):
        if offset in named:
            tokens.append(named[offset])
        else:
            tokens.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return tokens


# Training text for the tiny vocabulary: plain English plus every word the demo, the tests and the LLaVA-CoT
# stage format use, so common words become single tokens.
_TINY_CORPUS = """
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
How many cubes are there? How many objects are left after removing all the red spheres?
Describe the image in detail. What is shown in this image? Answer the question using a single word or phrase.
Which of these states is farthest north? What color is the car? Is there a cat on the table? Yes. No.
Select the correct answer from the options: A, B, C or D. The answer is A. The answer is B. The answer is C.
The chart shows the sales of each year. What is the value of the largest bar? The value is 42.
<SUMMARY> I will count the objects in the image and then answer the question. </SUMMARY>
<CAPTION> The image shows several geometric shapes on a gray floor: a large red cube, a small blue sphere,
a green cylinder and two yellow cubes. The light comes from the left and casts soft shadows. </CAPTION>
<REASONING> First, I identify each object. There are three cubes: one red and two yellow. There is one sphere
and one cylinder. Removing the red sphere leaves the other objects unchanged. So the total is four. </REASONING>
<CONCLUSION> 4 </CONCLUSION>
The man is riding a bicycle down a busy street while people walk on the sidewalk. A woman holds an umbrella.
A dog is sitting next to a child who is playing with a ball in the park. The sky is blue and there are clouds.
The triangle has sides of length 3, 4 and 5, so it is a right triangle and its area is 6 square units.
In the diagram, the angle ABC equals 60 degrees; therefore the angle ACB equals 30 degrees.
Plants need sunlight, water and air to grow. The process is called photosynthesis. Animals eat plants.
The document is a letter dated March 12, 1998, addressed to the director of the research department.
The table lists the population of five cities. The city with the highest population is Tokyo.
Think step by step. Explain your reasoning before giving the final answer. Let me think about this problem.
The relationship between the two people appears to be friends, because they are smiling and talking.
She said that they would arrive at ten o'clock, but they didn't come until noon. We're happy; you'll see.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 25 50 100 128 256 512 1000 2024 3.14 0.5 -1 +2 = 7% $5.
Punctuation and symbols: ( ) [ ] { } < > / \\ | : ; , . ! ? ' " - _ * & ^ # @ ~ ` = + newline:
first line
second line

after a blank line, with	a tab and     several spaces.
Small words: a an the of in on at to for from with by about as into like through after over between out
against during without before under around among is are was were be been being have has had do does did
can could will would shall should may might must this that these those it its he she they we you I me
him her them us my your his our their what which who whom whose when where why how all any both each few
more most other some such only own same so than too very just also not no nor but or and if then else.
Chat roles, as the template writes them right after a header token:
user
assistant
system
user
assistant
Chat roles: user assistant system. Cutting Knowledge Date: December 2023
Today Date: 26 Jul 2024

You are a helpful assistant.

Colors and shapes: red green blue yellow purple orange black white gray brown pink cyan metal rubber
shiny matte large small big tiny cube sphere cylinder cone square circle rectangle line point area length.
"""


@functools.lru_cache(maxsize=8)
def _train_tiny_bpe(num_base_tokens: int, leading_specials: tuple[str, ...] = ()) -> str:
    """Train the byte-level BPE once per size; returns its JSON (Tokenizer objects are mutable, JSON is not).
    `leading_specials` take the first ids and count towards `num_base_tokens`."""
    tokenizer = Tokenizer(models.BPE(fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=num_base_tokens,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(leading_specials),
    )
    tokenizer.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    trained = tokenizer.get_vocab_size()
    if trained != num_base_tokens:
        raise ValueError(
            f"the embedded corpus yields {trained} BPE tokens, not num_base_tokens={num_base_tokens}; "
            f"choose a size between 256 and {trained}"
        )
    return tokenizer.to_str()


def _prepend_bos(tokenizer: Tokenizer, bos: str) -> None:
    """BOS on `add_special_tokens=True` by the tokenizer's own post-processor: transformers 5.x would also add it
    from `add_bos_token`, 4.45's PreTrainedTokenizerFast would not (only its Llama classes read that flag)."""
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )


def _wrap(tokenizer: Tokenizer, add_bos_token: bool) -> PreTrainedTokenizerFast:
    """Append the Llama-3 specials and <|image|> in id order and wrap as a transformers tokenizer."""
    base = tokenizer.get_vocab_size()
    specials = llama3_special_tokens() + [chat.IMAGE]
    # Added tokens take consecutive ids after the model vocabulary, in the order given.
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    for offset, token in enumerate(specials):
        if tokenizer.token_to_id(token) != base + offset:
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, expected {base + offset}")
    if add_bos_token:
        _prepend_bos(tokenizer, chat.BOS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=chat.BOS,
        eos_token=chat.EOT,
        pad_token=chat.PAD,
        add_bos_token=add_bos_token,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


def build_tiny_tokenizer(
    num_base_tokens: int = DEFAULT_TINY_BASE_TOKENS, add_bos_token: bool = True
) -> PreTrainedTokenizerFast:
    """A small deterministic Llama-3-style tokenizer (see the module docstring for its id layout).

    `len(tokenizer) == num_base_tokens + 257`; the text vocabulary size is `num_base_tokens + 256`.
    """
    if not isinstance(num_base_tokens, int) or num_base_tokens < 257:
        raise ValueError(f"num_base_tokens must be an int >= 257 (256 byte tokens + merges), got {num_base_tokens}")
    return _wrap(Tokenizer.from_str(_train_tiny_bpe(num_base_tokens)), add_bos_token)


# Llama-2's (Vicuna v1.5's) special tokens at ids 0, 1, 2, and the two llava-hf appends after its vocabulary.
VICUNA_SPECIALS = ("<unk>", "<s>", "</s>")
LLAVA_IMAGE = "<image>"
LLAVA_PAD = "<pad>"


def build_tiny_vicuna_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """A small tokenizer with llava-hf's id layout: `<unk>` 0, `<s>` 1, `</s>` 2, byte-level BPE text up to
    `vocab_size - 3`, `<image>` `vocab_size - 2`, `<pad>` `vocab_size - 1` (32000 and 32001 in llava-hf's 32,064).
    It adds `<s>` on `add_special_tokens=True`, as Llama-2's does. For tests and tiny LLaVA models."""
    if not isinstance(vocab_size, int) or vocab_size < 262:
        raise ValueError(f"vocab_size must be an int >= 262 (3 specials, 256 bytes, <image>, <pad>), got {vocab_size}")
    tokenizer = Tokenizer.from_str(_train_tiny_bpe(vocab_size - 2, VICUNA_SPECIALS))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (LLAVA_IMAGE, LLAVA_PAD)])
    if tokenizer.token_to_id(LLAVA_PAD) != vocab_size - 1:
        raise RuntimeError(f"{LLAVA_PAD} got id {tokenizer.token_to_id(LLAVA_PAD)}, expected {vocab_size - 1}")
    _prepend_bos(tokenizer, "<s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token=LLAVA_PAD,
        add_bos_token=True,
        add_eos_token=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def save_tiny_tokenizer(directory: str | os.PathLike, num_base_tokens: int = DEFAULT_TINY_BASE_TOKENS) -> str:
    """Write the tiny tokenizer in Hugging Face format (tokenizer.json, tokenizer_config.json) to `directory`."""
    os.makedirs(directory, exist_ok=True)
    build_tiny_tokenizer(num_base_tokens).save_pretrained(directory)
    return os.fspath(directory)


def _read_quicktok_vocab(path: str) -> dict[bytes, int]:
    """Parse quicktok's binary vocabulary: u32 count, then [u16 length][bytes][u32 rank] per entry."""
    with open(path, "rb") as f:
        data = f.read()
    (count,) = struct.unpack_from("<I", data, 0)
    ranks, position = {}, 4
    for _ in range(count):
        (length,) = struct.unpack_from("<H", data, position)
        token = data[position + 2 : position + 2 + length]
        (rank,) = struct.unpack_from("<I", data, position + 2 + length)
        ranks[token] = rank
        position += 6 + length
    if position != len(data) or sorted(ranks.values()) != list(range(count)):
        raise ValueError(f"{path}: not a quicktok vocabulary of {count} consecutive ranks")
    return ranks


@functools.lru_cache(maxsize=1)
def _llama3_tokenizer_json() -> str:
    try:
        import importlib.resources

        import quicktok  # noqa: F401  (test-only dependency)
    except ImportError as e:
        raise ImportError("build_llama3_tokenizer needs the test extra: pip install quicktok-v1 tiktoken") from e
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab_path = os.fspath(importlib.resources.files("quicktok") / "data" / "llama3.vocab")
    ranks = _read_quicktok_vocab(vocab_path)
    if len(ranks) != LLAMA3_NUM_BASE_TOKENS:
        raise ValueError(f"{vocab_path}: {len(ranks)} tokens, expected {LLAMA3_NUM_BASE_TOKENS}")
    # transformers' converter reads tiktoken's text format: one "base64(token) rank" line per token.
    with tempfile.TemporaryDirectory() as tmp:
        tiktoken_file = os.path.join(tmp, "llama3.tiktoken")
        with open(tiktoken_file, "w") as f:
            for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
                f.write(f"{base64.b64encode(token).decode()} {rank}\n")
        tokenizer = TikTokenConverter(vocab_file=tiktoken_file, pattern=LLAMA3_PATTERN).converted()
    return tokenizer.to_str()


def build_llama3_tokenizer(add_bos_token: bool = True) -> PreTrainedTokenizerFast:
    """The real Llama-3.2-Vision tokenizer (128000 BPE ranks + 256 specials + `<|image|>` = 128256).

    Test-only: needs `quicktok-v1` and `tiktoken` (the `test` extra). Takes a few seconds; cached per process.
    """
    return _wrap(Tokenizer.from_str(_llama3_tokenizer_json()), add_bos_token)
