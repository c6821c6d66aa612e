"""The tokenizer interface over a real HF folder (Qwen2) and over the built-in BPE."""

import os

import pytest
import transformers

from gru_mem.data import vocabulary
from gru_mem.data.tokenizer import builtin_tokenizer, build_bpe_tokenizer, load_tokenizer

TEXT = "The magic number for amber-falcon is 7421.\n<check>yes</check> \\boxed{tango}"


@pytest.fixture
def qwen2_dir(sample_data):
  return os.path.join(sample_data, "qwen2_tokenizer")


def test_qwen2_folder_matches_transformers(qwen2_dir):
  ours = load_tokenizer(qwen2_dir)
  reference = transformers.AutoTokenizer.from_pretrained(qwen2_dir)
  assert ours.encode(TEXT) == reference.encode(TEXT, add_special_tokens=False)
  assert ours.decode(ours.encode(TEXT)) == TEXT
  assert ours.eos_id == reference.convert_tokens_to_ids("<|endoftext|>") == 151643
  assert ours.stop_ids == (151643, 151645)  # <|endoftext|> and ChatML's <|im_end|>
  assert ours.vocab_size == len(reference) == 151646
  assert ours.encode_batch([TEXT, "hi"]) == [ours.encode(TEXT), ours.encode("hi")]


def test_qwen2_chat_template(qwen2_dir):
  ours = load_tokenizer(qwen2_dir)
  assert ours.has_chat_template
  text = ours.apply_chat_template([{"role": "user", "content": "Where is it?"}])
  assert text == ("<|im_start|>system\nYou are a helpful assistant<|im_end|>\n"
                  "<|im_start|>user\nWhere is it?<|im_end|>\n<|im_start|>assistant\n")
  ids = ours.encode(text)
  assert ids[0] == ours.token_id("<|im_start|>") == 151644  # special tokens stay whole


def test_builtin_keeps_every_vocabulary_word_whole():
  tok = builtin_tokenizer()
  for word in vocabulary.all_words():
    assert len(tok.encode(word)) == 1, word
    assert len(tok.encode(" " + word)) == 1, word
  sentence = "the secret value of amber falcon is tango"
  assert len(tok.encode(sentence)) == len(sentence.split())


def test_builtin_encodes_unknown_text_byte_by_byte():
  tok = builtin_tokenizer()
  text = "Zyxw ünïcode 12"
  assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode("Zyxw")) == 4


def test_builtin_is_deterministic():
  first = build_bpe_tokenizer(vocabulary.all_words())
  second = build_bpe_tokenizer(vocabulary.all_words())
  assert first.get_vocab() == second.get_vocab()


def test_builtin_saved_folder_reloads_as_qwen2_with_same_ids(tmp_path):
  tok = builtin_tokenizer()
  tok.save(str(tmp_path))
  # Beside a qwen2 config.json, transformers rebuilds a Qwen2Tokenizer from vocab.json + merges.
  (tmp_path / "config.json").write_text('{"model_type": "qwen2"}')
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert type(reloaded).__name__ == "Qwen2Tokenizer"
  for text in (TEXT, "the magic number is 7", " ".join(vocabulary.all_words())):
    assert reloaded.encode(text, add_special_tokens=False) == tok.encode(text)
  ours = load_tokenizer(str(tmp_path))
  assert ours.eos_id == tok.eos_id and ours.has_chat_template


def test_missing_folder_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_tokenizer(str(tmp_path / "nope"))
