"""Looking inside a trained run: attention maps as heatmaps, and the exact loss of a split.

  attention  the softmax weights of every layer and head for a prompt: one PNG
             per layer (`layer_<i>.png`) with a grid of heads, rows = queries,
             columns = keys, tick labels = the prompt's tokens (characters,
             without BPE merges).
  eval       loss (nats per token), perplexity = exp(loss) and bits per
             character (the loss of all tokens / ln 2 / the characters they
             hold) over every window of a split: each token after the first
             is predicted exactly once.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import unicodedata
from typing import Any

import numpy as np

from nanodecoder.data import DataError
from nanodecoder.tokenizer import Tokenizer

VISIBLE = {'\n': '\\n', ' ': '␣', '\t': '\\t', '\r': '\\r'}


def char_label(char: str) -> str:
  """A tick label for `char`: itself, a visible stand-in for whitespace, or its code point ('U+4E09') for a
  control character or one the plots' font has no glyph for (it would be drawn as an empty box)."""
  if char in VISIBLE:
    return VISIBLE[char]
  if unicodedata.category(char).startswith('C') or ord(char) not in _font_characters():
    return f'U+{ord(char):04X}'
  return char


def token_label(piece: str, longest: int = 8) -> str:
  """A tick label for a token's text: its characters' labels, cut to `longest` characters with '…' (between two
  characters' labels, never inside a 'U+XXXX')."""
  labels = list(map(char_label, piece))
  if len(''.join(labels)) <= longest:
    return ''.join(labels)
  kept = ''
  for label in labels:
    if len(kept) + len(label) > longest - 1:
      break
    kept += label
  return kept + '…'


@functools.cache
def _font_characters() -> frozenset[int]:
  """The code points matplotlib's default font draws."""
  from matplotlib import font_manager, ft2font

  return frozenset(ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties())).get_charmap())


def attention_maps(model, tokenizer, prompt: str) -> tuple[np.ndarray, list[str]]:
  """([layers, heads, T, T] float32 attention weights, the text of each of the T tokens they are of) for `prompt`.

  A prompt longer than the model's context is cut to its last context_length
  tokens; rows are queries, columns keys, and each row sums to 1.
  """
  import jax
  import jax.numpy as jnp

  if not prompt:
    raise DataError('the prompt is empty; pass the text whose attention to draw with --prompt')
  ids = tokenizer.encode_last(prompt, model.cfg.context_length)
  maps = np.asarray(jax.device_get(model.attention_maps(jnp.asarray(ids)[None])), np.float32)[:, 0]
  return maps, [tokenizer.pieces[i] for i in ids]


def plot_attention(maps: np.ndarray, pieces, out_dir: str | pathlib.Path, title: str = '') -> list[pathlib.Path]:
  """Writes `layer_<i>.png` per layer into `out_dir` (removing other `layer_<i>.png` there): a heatmap per
  head, labelled with `pieces` (the text of each token, e.g. a string's characters); returns the paths."""
  from nanodecoder.summary import new_figure, save_png

  out_dir = pathlib.Path(out_dir)
  layers, heads, t, _ = maps.shape
  cols = min(heads, 4)
  rows = math.ceil(heads / cols)
  cell = min(max(0.14 * t, 2.5), 6.0)  # inches per heatmap
  step = max(1, math.ceil(t / 64))  # label at most 64 tokens per axis
  ticks = list(range(0, t, step))
  labels = [token_label(pieces[i]) for i in ticks]
  wide = step > 1 or t > 32 or any(len(pieces[i]) > 1 for i in ticks)  # x labels turned upright
  fontsize = max(4, min(9, 360 / len(ticks)))
  paths = []
  for layer in range(layers):
    figure = new_figure(cols * cell + 1.2, rows * cell + 0.8)
    axes = figure.subplots(rows, cols, squeeze=False)
    image = None
    for head in range(rows * cols):
      ax = axes[head // cols][head % cols]
      if head >= heads:
        ax.axis('off')
        continue
      image = ax.imshow(maps[layer, head], cmap='viridis', vmin=0.0, vmax=1.0, interpolation='nearest')
      ax.set_title(f'head {head}', fontsize=10)
      ax.set_xticks(ticks, labels, fontsize=fontsize, rotation=90 if wide else 0)
      ax.set_yticks(ticks, labels, fontsize=fontsize)
      ax.set_xlabel('key (attended to)', fontsize=8)
      ax.set_ylabel('query', fontsize=8)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label='attention weight')
    figure.suptitle(f'{title}layer {layer} (of {layers})')
    path = out_dir / f'layer_{layer}.png'
    save_png(figure, path)
    paths.append(path)
  for stale in set(out_dir.glob('layer_*.png')) - set(paths):  # of a deeper model drawn here before
    if stale.stem[len('layer_'):].isdigit():
      stale.unlink(missing_ok=True)
  return paths


def evaluate_split(workdir: str | pathlib.Path, which: str = 'latest', split: str | None = None,
                   data_locations: dict[str, str] | None = None) -> dict[str, Any]:
  """Exact loss, perplexity and bits per character of a checkpoint over every window of `split`.

  `split` defaults to the run's data.eval_split; the text comes from the
  run's data source, the tokenizer from the checkpoint. `data_locations`
  (fields of config.PATH_FIELDS -> paths) says where the data is now when it
  moved: the text found there must still be the text the checkpoint trained
  on. The devices must already be set up (cli.setup_jax). A step that a run
  training in the workdir deletes while it is read is replaced as in
  checkpoint.load_model.
  """
  from nanodecoder import checkpoint as checkpoint_lib

  return checkpoint_lib.read_while_training(workdir, which,
                                            lambda: _evaluate_split(workdir, which, split, data_locations))


def _evaluate_split(workdir: str | pathlib.Path, which: str, split: str | None,
                    data_locations: dict[str, str] | None) -> dict[str, Any]:
  import jax
  import ml_collections

  from nanodecoder import checkpoint as checkpoint_lib
  from nanodecoder import config as config_lib
  from nanodecoder import data as data_lib
  from nanodecoder import sharding as sharding_lib
  from nanodecoder import train as train_lib

  checkpoints, step, meta = checkpoint_lib.load_meta(workdir, which)
  try:
    with checkpoint_lib.reading(checkpoints, step):  # a record that lacks its config or tokenizer is damaged too
      config = config_lib.with_added_fields(ml_collections.ConfigDict(meta['config']))
      tokenizer = Tokenizer.from_json(meta['tokenizer'])
    split = config.data.eval_split if split is None else split  # ('' is no split: refused by name below)
    text_run = config.data.source == 'text'
    source = config.data.text_path if text_run else f'tfds {config.data.tfds_name}'
    given = ', '.join(f'--config.data.{field}' for field in data_locations or {})
    for field, path in (data_locations or {}).items():
      if (field == 'text_path') != text_run:  # a field this run's source does not read
        read = '--config.data.text_path' if text_run else '--config.data.manual_dir or --config.data.tfds_data_dir'
        raise config_lib.ConfigError(f'--config.data.{field} is not read by this run, which trained on {source}; '
                                     f'give where that is with {read}')
      config.data[field] = path
    config_lib.make_paths_absolute(config)
    source = config.data.text_path if text_run else source
    try:
      corpus = data_lib.load_corpus(config.data)
      text = corpus.text(split)
      tokens = tokenizer.encode(text)
      trained_on = meta.get('data_fingerprint')  # (none in checkpoints written before it was recorded)
      if trained_on is not None and data_lib.load_dataset(config, corpus, tokenizer).fingerprint() != trained_on:
        raise DataError(f'it holds other text than the checkpoint was trained on; point {given} at that text'
                        if given else 'it holds other text than the checkpoint was trained on (edited since); put '
                        'that text back')
    except ValueError as e:  # DataError and the like: the run's data, as its config names it, fixed where it lives
      where = f'as {given} says' if given else f'from the config saved with checkpoint {step}'
      moved = ('; if it moved, give its new place: --config.data.text_path=FILE'
               if text_run and not given and not os.path.exists(source) else '')
      raise DataError(f'--mode eval scores the data the run trained on ({source}, {where}): {e}{moved}') from None
    if len(tokens) < 2:
      raise DataError(f'split {split!r} has {len(tokens)} {tokenizer.unit}s; it needs at least 2 to predict one')
    config = config_lib.for_reading_here(config, jax.device_count(), jax.devices()[0])  # any machine
    mesh = sharding_lib.make_mesh(config.mesh)
    trainer = train_lib.create_trainer(config, config_lib.model_config(config, tokenizer.vocab_size), mesh,
                                       init=False)
    with checkpoint_lib.reading(checkpoints, step):
      params, _ = checkpoints.restore(step, trainer.abstract_state[0])  # not the optimizer state
  finally:
    checkpoints.close()
  loss, count = train_lib.window_loss(trainer, tokens, params)  # every token but the first predicted once
  predicted_chars = len(text) - len(tokenizer.pieces[tokens[0]])
  return {'workdir': str(workdir), 'step': step, 'split': split, 'unit': tokenizer.unit, 'characters': len(text),
          'tokens': len(tokens), 'predicted': int(count), 'predicted_characters': predicted_chars, 'loss': loss,
          'perplexity': math.exp(loss), 'bits_per_char': loss * int(count) / predicted_chars / math.log(2)}


def format_report(report: dict[str, Any]) -> str:
  """Loss and perplexity per token (a character, without BPE merges), bits per character."""
  unit = report['unit']
  chars = f' ({report["predicted_characters"]:,} characters)' if unit != 'character' else ''
  return (f'checkpoint step {report["step"]} of {report["workdir"]}, split {report["split"]!r}: '
          f'{report["predicted"]:,} {unit}s predicted{chars}\n'
          f'loss {report["loss"]:.4f} nats/{"char" if unit == "character" else unit} | perplexity '
          f'{report["perplexity"]:.3f} | {report["bits_per_char"]:.4f} bits/char')
