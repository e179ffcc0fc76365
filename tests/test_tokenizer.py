"""The tokenizer: characters, BPE merges learned on them, encoding and its JSON record."""

import collections
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nanodecoder.data import DataError
from nanodecoder.tokenizer import CHUNK, Tokenizer, learn_merges

TEXT = ('First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n'
        'First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n'
        'First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n') * 3


def reference_merges(chunks, first_id, num_merges):
  """BPE as defined, slowly: count every adjacent pair of every chunk, merge the most frequent (ties: lowest ids)
  everywhere, repeat. Returns (merges, the chunks' ids after them)."""
  def merge(ids, pair, new_id):  # left to right
    if len(ids) < 2:
      return list(ids)
    if tuple(ids[:2]) == pair:
      return [new_id, *merge(ids[2:], pair, new_id)]
    return [ids[0], *merge(ids[1:], pair, new_id)]

  words, merges = [list(c) for c in chunks], []
  while len(merges) < num_merges:
    counts = collections.Counter(p for w in words for p in zip(w, w[1:]))
    best = max(counts.values(), default=0)
    if best < 2:
      break
    pair = min(p for p, c in counts.items() if c == best)
    merges.append(pair)
    words = [merge(w, pair, first_id + len(merges) - 1) for w in words]
  return merges, words


def test_chunks_cover_every_character():
  rng = random.Random(0)
  alphabet = 'ab Z_9\n\t\r  .,;!?\'"-xé一丁\u0301٣ß'
  for _ in range(200):
    text = ''.join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    assert ''.join(CHUNK.findall(text)) == text
  assert CHUNK.findall("Hi, you  there_9 ok?\n\n") == ['Hi', ',', ' you', ' ', ' there', '_', '9', ' ok', '?', '\n\n']


@pytest.mark.parametrize('num_merges', [1, 7, 40, 1000])
def test_merges_are_those_of_the_definition(num_merges):
  tokenizer = Tokenizer(TEXT)
  chunks = [[tokenizer.chars.index(c) for c in chunk] for chunk in CHUNK.findall(TEXT)]
  merges, words = reference_merges(chunks, tokenizer.vocab_size, num_merges)
  assert learn_merges(chunks, tokenizer.vocab_size, num_merges) == merges
  trained = Tokenizer.train(TEXT, TEXT, tokenizer.vocab_size + num_merges)
  assert trained.merges == merges and trained.vocab_size == len(set(TEXT)) + len(merges)
  # Encoding the training text gives the segmentation training ended with.
  assert trained.encode(TEXT).tolist() == [i for w in words for i in w]
  if num_merges == 1000:  # it ran out: no pair occurs twice any more
    assert len(merges) < 1000 and max(collections.Counter(p for w in words for p in zip(w, w[1:])).values(), default=1) == 1


@pytest.mark.parametrize('seed', range(4))
def test_merges_and_encoding_are_those_of_the_definition_on_long_chunks(seed):
  # Text without spaces is a few long chunks; runs of one letter ('aaaa') hold overlapping pairs, merged left to right.
  rng = random.Random(seed)
  text = '\n'.join(''.join(rng.choice('aaab' if seed % 2 else 'ACGT') for _ in range(rng.randrange(1, 300)))
                   for _ in range(3))
  tokenizer = Tokenizer(text)
  chunks = [[tokenizer.chars.index(c) for c in chunk] for chunk in CHUNK.findall(text)]
  assert max(map(len, chunks)) > 100
  merges, words = reference_merges(chunks, tokenizer.vocab_size, 60)
  assert learn_merges(chunks, tokenizer.vocab_size, 60) == merges
  assert Tokenizer(text, merges).encode(text).tolist() == [i for w in words for i in w]


def test_bpe_round_trips_any_text_of_its_characters_and_its_json():
  tokenizer = Tokenizer.train(TEXT, TEXT, 80)
  assert tokenizer.unit == 'token' and tokenizer.vocab_size == 80
  assert ' speak' in tokenizer.pieces and 'First' in tokenizer.pieces
  ids = tokenizer.encode(TEXT)
  assert len(ids) < 0.6 * len(TEXT) and tokenizer.decode(ids) == TEXT
  rng = random.Random(1)
  for _ in range(50):
    text = ''.join(rng.choice(tokenizer.chars) for _ in range(rng.randrange(1, 60)))
    assert tokenizer.decode(tokenizer.encode(text)) == text
  again = Tokenizer.from_json(tokenizer.to_json())
  assert again == tokenizer and again.encode(TEXT).tolist() == ids.tolist()
  assert json.loads(tokenizer.to_json())['kind'] == 'bpe'
  with pytest.raises(DataError, match=r"^characters not in the vocabulary: 'Q', 'j'; use only characters"):
    tokenizer.encode('Quij')


def test_the_last_tokens_of_a_text_read_only_the_end_they_come_from():
  # (--mode attention draws the last context_length tokens of a prompt: text before them may hold any characters.)
  for tokenizer in (Tokenizer.train(TEXT, TEXT, 80), Tokenizer(TEXT)):
    ids = tokenizer.encode('\n' + TEXT).tolist()
    for count in (0, 1, 5, 16, len(ids) - 1, len(ids)):
      last = tokenizer.encode_last('~~~ QQQ\n' + TEXT, count)
      assert last.dtype == np.int32 and last.tolist() == ids[len(ids) - count:]
    with pytest.raises(DataError, match=r"^characters not in the vocabulary: 'Q'; use only"):
      tokenizer.encode_last('~~~ QQQ\n' + TEXT, len(ids) + 1)
    with pytest.raises(DataError, match=r"^characters not in the vocabulary: 'Q', '~'; use only"):
      tokenizer.encode_last('~~~ QQQ\n' + TEXT, len(ids) + 8)
    assert tokenizer.encode_last(TEXT, len(ids) + 8).tolist() == ids[1:]
  # Characters before the tokens found count a token each: those before what that covers are not named.
  tokenizer = Tokenizer.train('ab ', 'ab ab ab ab', 6)
  assert tokenizer.pieces[3:] == ['ab', ' ab'] and tokenizer.encode_last('~aaaaaaaa ab', 3).tolist() == [1, 1, 4]
  with pytest.raises(DataError, match=r"^characters not in the vocabulary: 'Q'; use only"):
    tokenizer.encode_last('~QQQQQQQQ ab', 3)
  # An unknown character early in a word (one chunk) that the tokens drawn do not reach: no merge crosses it.
  tokenizer = Tokenizer.train(TEXT, TEXT, 80)
  ids = tokenizer.encode('First Citizen').tolist()
  assert tokenizer.encode_last('~éFirst Citizen', len(ids)).tolist() == ids
  end = tokenizer.encode('Caius' * 40)[-5:].tolist()
  assert tokenizer.encode_last('ACGT' * 100 + '~' + 'Caius' * 40, 5).tolist() == end
  with pytest.raises(DataError, match=r"^characters not in the vocabulary: 'é'; use only"):
    tokenizer.encode_last('~éFirst Citizen', len(ids) + 1)


def test_merges_are_learned_on_the_training_text_only():
  tokenizer = Tokenizer.train(TEXT + 'zzzz zzzz zzzz', TEXT, 90)
  assert 'z' in tokenizer.chars and not any('zz' in piece for piece in tokenizer.pieces)
  assert tokenizer.decode(tokenizer.encode('zzzz')) == 'zzzz'


def test_without_merges_it_is_the_character_tokenizer():
  # data.vocab_size 0, or exactly the characters: one token per character, recorded as before merges existed.
  for vocab_size in (0, len(set(TEXT))):
    tokenizer = Tokenizer.train(TEXT, TEXT, vocab_size)
    assert tokenizer.merges == [] and tokenizer.unit == 'character'
    assert tokenizer.encode(TEXT).tolist() == [tokenizer.chars.index(c) for c in TEXT]
    assert json.loads(tokenizer.to_json()) == {'kind': 'char', 'chars': tokenizer.chars}
  assert Tokenizer.from_json(json.dumps({'kind': 'char', 'chars': 'ba'})).pieces == ['a', 'b']


def test_a_vocabulary_smaller_than_the_characters_is_refused():
  with pytest.raises(DataError, match=rf'^data.vocab_size=10 is below the {len(set(TEXT))} characters of the corpus'):
    Tokenizer.train(TEXT, TEXT, 10)


def test_training_is_deterministic_across_processes():
  # Every host of a run trains the tokenizer itself: Python's per-process string hashing must not matter.
  script = ('import sys; from nanodecoder.tokenizer import Tokenizer; '
            'print(Tokenizer.train(sys.argv[1], sys.argv[1], 120).to_json())')
  records = {subprocess.run([sys.executable, '-c', script, TEXT], env={**os.environ, 'PYTHONHASHSEED': seed},
                            capture_output=True, text=True, check=True).stdout for seed in ('1', '2')}
  assert records == {Tokenizer.train(TEXT, TEXT, 120).to_json() + '\n'}
  first = Tokenizer.from_json(records.pop())
  assert Tokenizer.train(TEXT, TEXT, 100).merges == first.merges[:100 - len(first.chars)]  # fewer: the first ones
