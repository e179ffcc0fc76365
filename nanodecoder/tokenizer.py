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


class DataError(ValueError):
  """The corpus cannot be read or does not fit the config (nanodecoder.data raises it too)."""


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
    self._refuse_unknown(set(text))
    if not self.merges:
      return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
    ids = itertools.chain.from_iterable(self._encode_chunk(chunk) for chunk in CHUNK.findall(text))
    return np.fromiter(ids, dtype=np.int32)

  def encode_last(self, text: str, count: int) -> np.ndarray:
    """The last `count` tokens of encode(text), from only as much of the end of `text` as they hold: merges never
    cross chunks, nor here a character outside the vocabulary, so those before that part are not refused (those named
    are surely in it, each character before the tokens found counting as one token)."""
    if not self.merges:
      return self.encode(text[max(len(text) - count, 0):])
    kept, total = [], 0
    for match in reversed(list(CHUNK.finditer(text))):
      if total >= count:
        break
      chunk = match.group()
      cut = max((i for i, c in enumerate(chunk) if c not in self._ids), default=-1)  # its last unknown character
      if cut + 1 < len(chunk):
        kept.append(self._encode_chunk(chunk[cut + 1:]))
        total += len(kept[-1])
      if cut >= 0 and total < count:  # the tokens needed reach that character
        end = match.start() + cut + 1
        self._refuse_unknown(set(text[max(end - (count - total), 0):end]))
    ids = list(itertools.chain.from_iterable(reversed(kept)))
    return np.asarray(ids[max(len(ids) - count, 0):], np.int32)

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

  def _refuse_unknown(self, characters: set[str]) -> None:
    unknown = sorted(characters - self._ids.keys())
    if unknown:
      raise DataError(f'characters not in the vocabulary: {", ".join(map(repr, unknown))}; '
                      'use only characters of the training corpus')

  def _char_ids(self, chunk: str) -> list[int]:
    return [self._ids[c] for c in chunk]

  def _encode_chunk(self, chunk: str) -> list[int]:
    """The merges applied to one chunk lowest rank first, each left to right: the segmentation training gave it."""
    ids = self._chunk_ids.get(chunk)
    if ids is None:
      ids = self._chunk_ids[chunk] = self._apply_merges(self._char_ids(chunk))
    return ids

  def _apply_merges(self, ids: list[int]) -> list[int]:
    # A heap of (rank, position) of the pairs that have a merge; one merge forms only pairs of higher ranks, so the
    # heap's order is the order above. Positions are a linked list; stale heap entries are skipped.
    ranks, first_id = self._ranks, len(self.chars)
    next_ = [*range(1, len(ids)), -1]
    prev = [-1, *range(len(ids) - 1)]
    heap = [(ranks[pair], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in ranks]
    heapq.heapify(heap)
    while heap:
      rank, position = heapq.heappop(heap)
      right = next_[position]
      if ids[position] < 0 or right < 0 or ranks.get((ids[position], ids[right])) != rank:
        continue
      ids[position], ids[right] = first_id + rank, -1
      after = next_[position] = next_[right]
      if after >= 0:
        prev[after] = position
      for start in (prev[position], position):
        if start >= 0 and next_[start] >= 0 and (pair := (ids[start], ids[next_[start]])) in ranks:
          heapq.heappush(heap, (ranks[pair], start))
    return [i for i in ids if i >= 0]


def learn_merges(chunks: list[list[int]], first_id: int, num_merges: int) -> list[tuple[int, int]]:
  """Up to `num_merges` merges of the id sequences `chunks`, the most frequent adjacent pair first (ties: lowest
  ids), numbered from `first_id`; stops early when no pair occurs twice."""
  text = _LinkedText(collections.Counter(map(tuple, chunks)))
  heap = [(-count, pair) for pair, count in text.counts.items()]  # stale entries are skipped when popped
  heapq.heapify(heap)
  merges = []
  while heap and len(merges) < num_merges:
    negative_count, pair = heapq.heappop(heap)
    if -negative_count != text.counts.get(pair):
      continue
    if -negative_count < 2:
      break
    merges.append(pair)
    for changed in text.merge(pair, first_id + len(merges) - 1):
      heapq.heappush(heap, (-text.counts[changed], changed))
  return merges


class _LinkedText:
  """Distinct chunks end to end as doubly linked lists of token ids, each position weighted by how often its chunk
  occurs, with the weighted count of every adjacent pair and the positions that start it. A merge visits only the
  places of its pair, so a long chunk (text without spaces) costs no more than many short ones."""

  def __init__(self, weighted_chunks: dict[tuple[int, ...], int]):
    self.ids, self.weights, self.next, self.prev = [], [], [], []  # per position; next/prev -1 at a chunk's ends
    for chunk, weight in weighted_chunks.items():
      start, end = len(self.ids), len(self.ids) + len(chunk)
      self.ids += chunk
      self.weights += [weight] * len(chunk)
      self.next += [*range(start + 1, end), -1][:len(chunk)]
      self.prev += [-1, *range(start, end - 1)][:len(chunk)]
    self.counts: collections.Counter = collections.Counter()
    self.places = collections.defaultdict(set)  # pair -> positions of its first token
    for position, right in enumerate(self.next):
      if right >= 0:
        self._count(position, 1)

  def merge(self, pair: tuple[int, int], new_id: int) -> set[tuple[int, int]]:
    """Replaces each occurrence of `pair`, left to right within a chunk, by `new_id`; returns the pairs whose count
    changed and is still above 0 (the others are dropped)."""
    ids, changed = self.ids, set()
    for position in sorted(self.places.pop(pair)):
      right = self.next[position]
      if ids[position] != pair[0]:  # taken by the merge just left of it ('aaa': the first 'aa' wins)
        continue
      left, after = self.prev[position], self.next[right]
      for start in (left, right):
        if start >= 0 and self.next[start] >= 0:
          changed.add(self._count(start, -1))
      ids[position], ids[right] = new_id, -1
      self.next[position] = after
      if after >= 0:
        self.prev[after] = position
      for start in (left, position):
        if start >= 0 and self.next[start] >= 0:
          changed.add(self._count(start, 1))
    for gone in [p for p in changed | {pair} if self.counts[p] <= 0 or p == pair]:
      self.counts.pop(gone, None)
      self.places.pop(gone, None)
      changed.discard(gone)
    return changed

  def _count(self, position: int, sign: int) -> tuple[int, int]:
    """Adds (sign 1) or removes (-1) the pair that starts at `position`; returns it."""
    pair = (self.ids[position], self.ids[self.next[position]])
    self.counts[pair] += sign * self.weights[position]
    (self.places[pair].add if sign > 0 else self.places[pair].discard)(position)
    return pair
