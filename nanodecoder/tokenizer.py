"""The tokenizer: the characters of the corpus, optionally with byte-pair merges on top.

With no merges (the default, `data.vocab_size = 0`) each character is one
token, ids in sorted character order (65 for tiny-shakespeare). With
`data.vocab_size = N` the tokenizer also learns byte-pair encoding (BPE)
merges on the training text, over those characters: the most frequent
adjacent pair of tokens becomes a new token, again and again, until there are
N tokens or no pair occurs twice. Merges never cross the boundaries of the
text's chunks (a word with the space before it, a run of digits, of
punctuation or of spaces, as GPT-2 splits text), and ties go to the pair of
lowest ids, so the same text always gives the same merges, on every host.

Either way every character of the corpus has a token, so any text of those
characters encodes, and decoding gives back exactly the text encoded.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import json
import re

import numpy as np

# A word with the space before it, a number, punctuation, or whitespace (a run's last space goes to what follows
# it, as in GPT-2's pattern; a run ending in a newline stays whole, so '\n\n' can merge). Every character falls
# into one chunk: letters, digits and '_' make up \w.
CHUNK = re.compile(r' ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?= \S)|\s+')


class Tokenizer:
  """Ids of the characters `chars` (sorted) followed by one per merge; `merges[i]` = the id pair that token
  len(chars) + i joins."""

  def __init__(self, chars: str, merges: list[tuple[int, int]] = ()):
    self.chars = ''.join(sorted(set(chars)))
    self.merges = [tuple(pair) for pair in merges]
    self._ids = {c: i for i, c in enumerate(self.chars)}
    self.pieces = list(self.chars)  # the text of each token
    for left, right in self.merges:
      self.pieces.append(self.pieces[left] + self.pieces[right])
    self._ranks = {pair: rank for rank, pair in enumerate(self.merges)}
    self._chunk_ids: dict[str, list[int]] = {}  # encoded chunks, reused

  @classmethod
  def train(cls, chars: str, text: str, vocab_size: int = 0) -> Tokenizer:
    """The characters `chars`, plus merges learned on `text` up to `vocab_size` tokens (0: none)."""
    tokenizer = cls(chars)
    if vocab_size and vocab_size < tokenizer.vocab_size:
      from nanodecoder.data import DataError  # (data imports this module)

      raise DataError(f'data.vocab_size={vocab_size} is below the {tokenizer.vocab_size} characters of the corpus, '
                      'each of which needs a token; use 0 (one token per character) or at least '
                      f'{tokenizer.vocab_size}')
    if vocab_size > tokenizer.vocab_size:
      tokenizer = cls(chars, learn_merges([tokenizer._char_ids(chunk) for chunk in CHUNK.findall(text)],
                                          tokenizer.vocab_size, vocab_size - tokenizer.vocab_size))
    return tokenizer

  @property
  def vocab_size(self) -> int:
    return len(self.pieces)

  @property
  def unit(self) -> str:
    """What one token is: 'character', or 'token' when merges join characters."""
    return 'token' if self.merges else 'character'

  def encode(self, text: str) -> np.ndarray:
    unknown = sorted(set(text) - self._ids.keys())
    if unknown:
      from nanodecoder.data import DataError  # (data imports this module)

      raise DataError(f'characters not in the vocabulary: {", ".join(map(repr, unknown))}; '
                      'use only characters of the training corpus')
    if not self.merges:
      return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
    ids = itertools.chain.from_iterable(self._encode_chunk(chunk) for chunk in CHUNK.findall(text))
    return np.fromiter(ids, dtype=np.int32)

  def decode(self, ids) -> str:
    return ''.join(self.pieces[i] for i in np.asarray(ids).reshape(-1))

  def to_json(self) -> str:
    if not self.merges:
      return json.dumps({'kind': 'char', 'chars': self.chars})
    return json.dumps({'kind': 'bpe', 'chars': self.chars, 'merges': self.merges})

  @classmethod
  def from_json(cls, text: str) -> Tokenizer:
    record = json.loads(text)
    if record.get('kind') not in ('char', 'bpe'):
      raise ValueError(f'unknown tokenizer kind {record.get("kind")!r}')
    return cls(record['chars'], record.get('merges', ()))

  def __eq__(self, other) -> bool:
    return isinstance(other, Tokenizer) and (self.chars, self.merges) == (other.chars, other.merges)

  def _char_ids(self, chunk: str) -> list[int]:
    return [self._ids[c] for c in chunk]

  def _encode_chunk(self, chunk: str) -> list[int]:
    """The merges applied to one chunk lowest rank first: the segmentation training gave it."""
    ids = self._chunk_ids.get(chunk)
    if ids is None:
      ids = self._char_ids(chunk)
      while len(ids) > 1:
        pair = min(zip(ids, ids[1:]), key=lambda p: self._ranks.get(p, len(self._ranks)))
        if pair not in self._ranks:
          break
        ids = _merge(ids, pair, len(self.chars) + self._ranks[pair])
      self._chunk_ids[chunk] = ids
    return ids


def learn_merges(chunks: list[list[int]], first_id: int, num_merges: int) -> list[tuple[int, int]]:
  """Up to `num_merges` merges of the id sequences `chunks`, the most frequent adjacent pair first (ties: lowest
  ids), numbered from `first_id`; stops early when no pair occurs twice."""
  counted = collections.Counter(map(tuple, chunks))
  words, freqs = [list(w) for w in counted], list(counted.values())
  pair_counts: collections.Counter = collections.Counter()
  holders = collections.defaultdict(set)  # pair -> indices of words that held it (some no longer do)
  for index, (word, freq) in enumerate(zip(words, freqs)):
    for pair in zip(word, word[1:]):
      pair_counts[pair] += freq
      holders[pair].add(index)
  heap = [(-count, pair) for pair, count in pair_counts.items()]  # stale entries are skipped when popped
  heapq.heapify(heap)
  merges = []
  while heap and len(merges) < num_merges:
    negative_count, pair = heapq.heappop(heap)
    if -negative_count != pair_counts.get(pair):
      continue
    if -negative_count < 2:
      break
    new_id = first_id + len(merges)
    merges.append(pair)
    changed = set()
    for index in holders.pop(pair):
      word, freq = words[index], freqs[index]
      merged = _merge(word, pair, new_id)
      if len(merged) == len(word):
        continue
      for old in zip(word, word[1:]):
        pair_counts[old] -= freq
        changed.add(old)
      for new in zip(merged, merged[1:]):
        pair_counts[new] += freq
        holders[new].add(index)
        changed.add(new)
      words[index] = merged
    for other in changed:
      if pair_counts[other] > 0 and other != pair:
        heapq.heappush(heap, (-pair_counts[other], other))
      elif pair_counts[other] <= 0:
        del pair_counts[other]
    pair_counts.pop(pair, None)
  return merges


def _merge(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
  """`ids` with each occurrence of `pair`, left to right, replaced by `new_id`."""
  out, i = [], 0
  while i < len(ids):
    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
      out.append(new_id)
      i += 2
    else:
      out.append(ids[i])
      i += 1
  return out
