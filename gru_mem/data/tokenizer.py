"""One tokenizer interface for the whole codebase.

Two sources:
  * `load_tokenizer(dir)`: any local HF tokenizer folder, through `AutoTokenizer`
    (trust_remote_code off), e.g. Qwen2.5's.
  * `builtin_tokenizer()`: built in code, no files. A small byte-level BPE with Qwen2's
    pre-tokenizer, trained on `vocabulary.all_words()` until every listed word is one token, so it
    is word-level on the synthetic tasks, still encodes any text byte by byte, and is rebuilt
    exactly by transformers' `Qwen2Tokenizer` when saved next to an exported model.

Ids the tokenizer has no token for. A model's embedding is usually padded past its tokenizer
(Qwen2.5: 151,936 rows, 151,646 tokens; the built-in tokenizer's model is rounded up to a multiple
of 64), so a sampler can emit an id >= `vocab_size`. `Tokenizer.decode` turns each such id into
one U+FFFD (REPLACEMENT CHARACTER) and decodes the ids between them as usual; nothing is passed
to the HF backend that it has no token for (the Rust backend silently drops such ids, Python
tokenizers raise). U+FFFD rather than nothing: the text still shows that the model wrote a
non-token there, a tag or a gate word split by one stays broken instead of being glued back into
a well-formed one, and re-encoding the text (how a memory is fed to the next turn) gives
ordinary in-vocabulary ids -- U+FFFD is also what the byte-level decoder already writes for a
broken UTF-8 byte sequence. A negative id is never generated, so it is an error.
"""

from __future__ import annotations

import functools
import os
from typing import Iterable, Optional, Sequence

from gru_mem.data import vocabulary

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
REPLACEMENT_CHARACTER = "\ufffd"  # what an id past the tokenizer's last token decodes to

# Qwen2's pre-tokenizer split (digits one by one, letters with one leading non-letter, ...).
QWEN2_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                       r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML, the format of Qwen2.5-Instruct, without a default system message.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}")


BUILTIN_NAME = "gru_mem-builtin"


class Tokenizer:
  """encode / decode / special ids / optional chat template over an HF tokenizer."""

  def __init__(self, hf_tokenizer, name: str = ""):
    self.hf = hf_tokenizer
    self.name = name or getattr(hf_tokenizer, "name_or_path", "")
    eos = hf_tokenizer.eos_token_id
    if eos is None:
      eos = self.token_id(ENDOFTEXT)
    if eos is None:
      raise ValueError(f"tokenizer {self.name!r} has no EOS token: set eos_token in its "
                       "tokenizer_config.json")
    self.eos_id: int = int(eos)
    pad = hf_tokenizer.pad_token_id
    self.pad_id: int = int(pad) if pad is not None else self.eos_id
    # Turn-ending tokens a chat model emits (ChatML ends an assistant turn with <|im_end|>).
    im_end = self.token_id(IM_END)
    self.stop_ids: tuple[int, ...] = tuple(sorted({self.eos_id} | ({im_end} if im_end is not None else set())))

  @property
  def vocab_size(self) -> int:
    """Number of ids in use (base vocabulary plus added tokens)."""
    return len(self.hf)

  @property
  def is_builtin(self) -> bool:
    """The built-in tokenizer, also as saved in a run folder or an exported model (its ChatML
    template is the marker that survives saving)."""
    return self.name == BUILTIN_NAME or getattr(self.hf, "chat_template", None) == CHATML_TEMPLATE

  @property
  def has_chat_template(self) -> bool:
    return bool(getattr(self.hf, "chat_template", None))

  def token_id(self, token: str) -> Optional[int]:
    """The id of one vocabulary entry (e.g. a special token), or None if it is not one."""
    token_id = self.hf.convert_tokens_to_ids(token)
    if token_id is None or self.hf.convert_ids_to_tokens(token_id) != token:
      return None  # an unknown token maps to the unk id, whose text differs
    return int(token_id)

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`; no BOS/EOS are added. Texts longer than the model's window are
    expected (documents are chunked after encoding), so transformers' length notice is off."""
    return list(self.hf.encode(text, add_special_tokens=False, verbose=False))

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    encoded = self.hf(list(texts), add_special_tokens=False, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """The text of `ids`; each id >= vocab_size becomes one U+FFFD (see the module docstring)."""
    ids = [int(i) for i in ids]
    if ids and min(ids) < 0:
      raise ValueError(f"decode: token id {min(ids)} is negative: ids must be in [0, vocab_size)")
    size = self.vocab_size
    if not ids or max(ids) < size:
      return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
    skip = skip_special_tokens
    pieces, run = [], []  # run: the in-vocabulary ids since the last out-of-range one
    for token_id in ids:
      if token_id < size:
        run.append(token_id)
        continue
      pieces += [self.hf.decode(run, skip_special_tokens=skip), REPLACEMENT_CHARACTER]
      run = []
    pieces.append(self.hf.decode(run, skip_special_tokens=skip))
    return "".join(pieces)

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The chat-formatted text of `messages`; the plain concatenation when there is no template."""
    if not self.has_chat_template:
      return "\n\n".join(m["content"] for m in messages) + ("\n\n" if add_generation_prompt else "")
    return self.hf.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=add_generation_prompt)

  def save(self, out_dir: str) -> None:
    """Writes the HF tokenizer files (tokenizer.json, vocab.json, merges.txt, configs) to out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    self.hf.save_pretrained(out_dir)
    backend = getattr(self.hf, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
      backend.model.save(out_dir)  # vocab.json + merges.txt, what Qwen2Tokenizer rebuilds from


def load_tokenizer(path: str) -> Tokenizer:
  """A tokenizer from a local HF folder (never a hub download, never remote code)."""
  if not os.path.isdir(path):
    raise FileNotFoundError(f"tokenizer folder {path!r} does not exist: pass a local HF tokenizer folder")
  import transformers
  try:
    hf = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False,
                                                    local_files_only=True)
  except Exception as e:  # transformers raises several types; name the folder in every case.
    raise ValueError(f"could not load a tokenizer from {path}: {e}") from e
  return Tokenizer(hf, name=path)


def _training_texts(words: Sequence[str]) -> list[str]:
  """Each word alone and after a space (its two forms in running text), many times over."""
  texts = []
  for word in words:
    texts.extend([word, " " + word] * 4)
  texts.extend(vocabulary.PUNCTUATION * 4)
  return texts


def build_bpe_tokenizer(words: Sequence[str]):
  """Trains a byte-level BPE (`tokenizers.Tokenizer`) with Qwen2's pre-tokenizer on `words`.

  With no vocabulary cap, merging continues until no pair repeats, i.e. until every training word
  (with and without its leading space) is a single token.
  """
  from tokenizers import Regex, Tokenizer as RawTokenizer, decoders, models, normalizers
  from tokenizers import pre_tokenizers, trainers

  tok = RawTokenizer(models.BPE())
  tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=1_000_000, min_frequency=2, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      special_tokens=[ENDOFTEXT, IM_START, IM_END])
  tok.train_from_iterator(_training_texts(words), trainer=trainer)
  return tok


@functools.lru_cache(maxsize=4)
def builtin_tokenizer(extra_words: tuple[str, ...] = ()) -> Tokenizer:
  """The built-in tokenizer for synthetic tasks (deterministic: the same ids on every machine)."""
  import transformers
  raw = build_bpe_tokenizer(vocabulary.all_words() + tuple(extra_words))
  hf = transformers.PreTrainedTokenizerFast(
      tokenizer_object=raw, eos_token=ENDOFTEXT, pad_token=ENDOFTEXT,
      additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
      model_max_length=1_000_000_000)
  hf.chat_template = CHATML_TEMPLATE
  hf.name_or_path = BUILTIN_NAME
  tokenizer = Tokenizer(hf, name=BUILTIN_NAME)
  return tokenizer
