"""Loading experiment files and checking configs before any work starts.

Every check raises `ConfigError` with one line that names the field, the bad
value, and how to fix it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import math
import os
import pathlib
from typing import Any

import ml_collections

from nanodecoder.metrics import flatten_config
from nanodecoder.model import ATTENTION_IMPLS, REMAT_POLICIES, ModelConfig


SAVED_CONFIG = 'config.json'  # a run's resolved config, in its workdir


class ConfigError(ValueError):
  """A config field holds a value the trainer cannot use."""


# Every config has exactly these fields (experiments/base.py sets and explains each; a test keeps them equal).
FIELDS = frozenset((
    'name', 'seed',
    'model.num_layers', 'model.num_heads', 'model.head_size', 'model.context_length', 'model.mlp_ratio',
    'model.dropout', 'model.use_bias', 'model.tie_embeddings', 'model.dtype', 'model.param_dtype',
    'model.attention_impl', 'model.remat', 'model.scan_layers',
    'data.source', 'data.tfds_name', 'data.tfds_data_dir', 'data.manual_dir', 'data.text_path',
    'data.text_eval_fraction', 'data.train_split', 'data.eval_split', 'data.vocab_size',
    'train.batch_size', 'train.num_steps', 'train.learning_rate', 'train.warmup_steps', 'train.decay_steps',
    'train.min_learning_rate', 'train.beta1', 'train.beta2', 'train.weight_decay', 'train.grad_clip',
    'train.grad_accum_steps', 'train.steps_per_call', 'train.log_every', 'train.profile_steps',
    'train.profile_start',
    'eval.every', 'eval.batches', 'eval.all_windows',
    'checkpoint.every', 'checkpoint.keep', 'checkpoint.keep_best', 'checkpoint.async_save',
    'mesh.data', 'mesh.fsdp', 'mesh.tensor', 'mesh.cpu_devices',
))


# Fields a run's config may change between sessions without changing what it trains: its length (more steps
# extend a run; the schedule's train.decay_steps is compared), how the same math is computed (the device layout: a
# checkpoint restores onto any mesh, and parallel sweeps set mesh.cpu_devices per point; steps per compiled call,
# micro-batches, recomputation, the attention kernel: the remedies for running out of memory or moving to other
# hardware, which change results only by rounding, and with dropout, micro-batches draw other masks), how often it
# logs, profiles, evaluates and saves (and how many checkpoints it keeps, written in the background or not), and
# where this machine keeps the same data. A trailing '.' covers a whole section.
RESUMABLE_CHANGES = ('train.num_steps', 'mesh.', 'train.steps_per_call', 'train.grad_accum_steps', 'model.remat',
                     'model.attention_impl', 'train.log_every', 'train.profile_steps', 'train.profile_start',
                     'eval.every', 'checkpoint.', 'data.manual_dir', 'data.tfds_data_dir')


def changes_on_resume(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
                      ) -> list[tuple[str, Any, Any]]:
  """[(field, saved value, new value)] of the fields outside RESUMABLE_CHANGES in which `config` differs from the
  config a run saved (a run resumed under it would continue from a state its settings never produced, e.g. a
  decayed schedule); empty when they agree."""
  before = flatten_config(json.loads(saved.to_json()))  # JSON on both sides: tuples are lists
  changes = []
  for field, value in flatten_config(json.loads(config.to_json())).items():
    if field.startswith('data.') and field[5:] in PATH_FIELDS and before.get(field):
      before[field] = os.path.abspath(before[field])  # saved relative before paths were made absolute
    allowed = any(field == f or (f.endswith('.') and field.startswith(f)) for f in RESUMABLE_CHANGES)
    if field in before and before[field] != value and not allowed:
      changes.append((field, before[field], value))
  return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
  """'field=saved, not new' for the first of changes_on_resume's changes, naming the other fields after it."""
  field, before, now = changes[0]
  others = f' (and {", ".join(f for f, _, _ in changes[1:])})' if len(changes) > 1 else ''
  return f'{field}={before!r}, not {now!r}{others}'


def is_number(value) -> bool:
  """An int or float, not a bool (which Python counts as an int)."""
  return isinstance(value, (int, float)) and not isinstance(value, bool)


# Fields added after runs were saved, with the value that does what those runs did.
ADDED_FIELDS = {'data.vocab_size': 0}


def with_added_fields(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config`, saved by a run, with ADDED_FIELDS it lacks set to their values there (in place)."""
  for dotted, value in ADDED_FIELDS.items():
    section, name = dotted.split('.')
    if isinstance(config.get(section), ml_collections.ConfigDict) and name not in config[section]:
      config[section][name] = value
  return config


def check_fields(config: ml_collections.ConfigDict) -> None:
  """Refuses a config with a field no code reads (a misspelt name) or without one that the code reads."""
  fields = set(flatten_config(config))
  unknown, missing = sorted(fields - FIELDS), sorted(FIELDS - fields)
  if unknown:
    close = difflib.get_close_matches(unknown[0], FIELDS, n=1)
    hint = f' (did you mean {close[0]}?)' if close else ''
    raise ConfigError(f'unknown config field {unknown[0]}{hint}; fix its name or remove it (the fields are those '
                      'of experiments/base.py)')
  if missing:
    others = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise ConfigError(f'the config has no field {missing[0]}{others}; every config needs the fields of '
                      'experiments/base.py: add it')


def read_saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The resolved config a run saved in its workdir; OSError or ValueError when it cannot be read."""
  saved = json.loads((pathlib.Path(workdir) / SAVED_CONFIG).read_text(encoding='utf-8'))
  if not isinstance(saved, dict):
    raise ValueError('not a JSON object')
  config = with_added_fields(ml_collections.ConfigDict(saved))
  check_fields(config)
  return config


def load_experiment(spec: str | pathlib.Path) -> tuple[Any, str]:
  """The module of experiment file `path.py` (or `path.py:arg`) and its argument ('' when none)."""
  path, _, arg = str(spec).partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'config file {path!r} does not exist; pass a file such as experiments/cpu.py')
  module_spec = importlib.util.spec_from_file_location(f'_nanodecoder_experiment_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module, arg


def load_config_file(spec: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Loads `path.py` or `path.py:arg` and returns its `get_config([arg])`."""
  module, arg = load_experiment(spec)
  return module.get_config(arg) if arg else module.get_config()


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """`set_field(config, 'model.num_layers', 4)`, refusing unknown fields and wrong types."""
  *parents, leaf = dotted.split('.')
  node = config
  for i, name in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise ConfigError(f'unknown config field {".".join(parents[:i + 1])!r} (in {dotted!r}); see '
                        'experiments/base.py for the fields')
    node = node[name]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f'unknown config field {dotted!r}; see experiments/base.py for the fields')
  if isinstance(node[leaf], ml_collections.ConfigDict):
    raise ConfigError(f'config field {dotted!r} is a section; set its fields, e.g. '
                      f'{dotted}.{next(iter(node[leaf].keys()))}')
  try:
    node[leaf] = value
  except TypeError as e:  # ml_collections' message spans lines
    reason = ' '.join(str(e).split())
    raise ConfigError(f'config field {dotted!r} cannot take {value!r}: {reason}') from None


PATH_FIELDS = ('text_path', 'manual_dir', 'tfds_data_dir')  # of config.data


def make_paths_absolute(config: ml_collections.ConfigDict) -> None:
  """Turns the data paths given relative to the current folder absolute, so that the config a run saves finds
  its data from anywhere (`--mode eval` reads the text again)."""
  for field in PATH_FIELDS:
    if config.data[field]:
      config.data[field] = os.path.abspath(os.path.expanduser(config.data[field]))


def for_reading_here(config: ml_collections.ConfigDict, num_devices: int, device) -> ml_collections.ConfigDict:
  """A saved run's config made to read its checkpoints on `num_devices` devices like `device` (evaluation,
  sampling): data parallel over them, the batch rounded up to fill them, and 'auto' attention where the run's
  'cudnn' or 'xla' cannot run (off NVIDIA GPUs, or its head size on GPUs before Hopper; float16 'xla' on CPU).
  What it computes is unchanged."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  config.train.grad_accum_steps = 1
  config.train.batch_size = -(-config.train.batch_size // num_devices) * num_devices
  if attention_cannot_run(config.model, device.platform, getattr(device, 'compute_capability', None)):
    config.model.attention_impl = 'auto'
  return config


def attention_cannot_run(model: ml_collections.ConfigDict, platform: str,
                         compute_capability: str | None = None) -> str | None:
  """Why `model.attention_impl` cannot run on `platform` devices (NVIDIA GPUs: of `compute_capability`, e.g.
  '8.0') (one line naming the fix), or None."""
  if model.attention_impl == 'cudnn' and platform != 'gpu':
    return (f"model.attention_impl='cudnn' needs NVIDIA GPUs, but the mesh is on {platform} devices; use 'auto' "
            "or 'einsum'")
  if (model.attention_impl == 'cudnn' and model.head_size > 128 and compute_capability
      and float(compute_capability) < 9):
    return (f"model.attention_impl='cudnn' takes model.head_size up to 128 on these GPUs (compute capability "
            f"{compute_capability}; 256 from Hopper, 9.0, on), got {model.head_size}; use 'auto' or a smaller "
            "head_size")
  if model.attention_impl == 'xla' and model.dtype == 'float16' and platform == 'cpu':
    return ("model.attention_impl='xla' with model.dtype='float16' does not run on cpu devices (no float16 matmul "
            "with float32 sums there); use 'auto' or 'einsum', or bfloat16")
  return None


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The ModelConfig of `config.model` (every ModelConfig field but the vocabulary size is a config field)."""
  fields = (f.name for f in dataclasses.fields(ModelConfig) if f.name != 'vocab_size')
  return ModelConfig(vocab_size=vocab_size, **{name: config.model[name] for name in fields})


_POSITIVE = (
    'model.num_layers', 'model.num_heads', 'model.head_size', 'model.context_length', 'model.mlp_ratio',
    'train.batch_size', 'train.num_steps', 'train.decay_steps', 'train.log_every', 'train.steps_per_call',
    'train.grad_accum_steps',
    'eval.every', 'eval.batches', 'checkpoint.every', 'checkpoint.keep',
)
_NON_NEGATIVE = ('seed', 'data.vocab_size', 'train.warmup_steps', 'train.profile_steps', 'train.profile_start',
                 'mesh.cpu_devices')
_BOOLEAN = ('model.use_bias', 'model.tie_embeddings', 'model.scan_layers', 'eval.all_windows', 'checkpoint.keep_best',
            'checkpoint.async_save')
_FINITE = ('model.dropout', 'train.learning_rate', 'train.min_learning_rate', 'train.beta1', 'train.beta2',
           'train.weight_decay', 'train.grad_clip', 'data.text_eval_fraction')
_FLOAT32_MAX = 3.4028234663852886e38
_CHOICES = {
    'data.source': ('tfds', 'text'),
    'model.dtype': ('float32', 'bfloat16', 'float16'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.attention_impl': ATTENTION_IMPLS,
    'model.remat': REMAT_POLICIES,
}


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  """`get_field(config, 'model.num_layers')`: the value of a dotted field (a ConfigDict for a section)."""
  node = config
  for name in dotted.split('.'):
    node = node[name]
  return node


def _check_attention_impl(m: ml_collections.ConfigDict) -> None:
  """Refuses fused attention settings that cannot run. Backend-agnostic (a sweep validates its points on the
  launching host): training refuses 'cudnn' off GPUs where the devices are known (`train.check_mesh_fits`)."""
  impl = m.attention_impl
  if impl in ('xla', 'cudnn') and m.dropout > 0:
    raise ConfigError(f'model.attention_impl={impl!r} has no attention-weight dropout but model.dropout={m.dropout}; '
                      "use 'auto' (fused where no dropout is active) or set model.dropout=0")
  if impl != 'cudnn':
    return
  if m.dtype == 'float32':
    raise ConfigError("model.attention_impl='cudnn' needs model.dtype='bfloat16' or 'float16', got 'float32'; "
                      "set model.dtype=bfloat16 or use attention_impl='auto'")
  if m.head_size % 8 or m.head_size > 256:  # (up to 128 before Hopper: checked where the GPUs are known)
    raise ConfigError(f"model.attention_impl='cudnn' needs model.head_size a multiple of 8 up to 256 (128 before "
                      f"Hopper GPUs), got {m.head_size}; use attention_impl='auto' or change head_size")


def check_mesh_shape(config: ml_collections.ConfigDict, data: int, fsdp: int, tensor: int) -> None:
  """Refuses mesh axis sizes that the heads, widths or batch cannot be split over."""
  m, batch, accum = config.model, config.train.batch_size, config.train.grad_accum_steps
  if m.num_heads % tensor:  # (then it divides the feed-forward width, mlp_ratio * num_heads * head_size, too)
    raise ConfigError(f'mesh.tensor={tensor} does not divide model.num_heads={m.num_heads}; pick a tensor size '
                      'that divides the number of heads')
  if (m.num_heads * m.head_size) % fsdp:
    raise ConfigError(f'mesh.fsdp={fsdp} does not divide the embedding width '
                      f'{m.num_heads * m.head_size}; pick an fsdp size that divides it')
  dp = data * fsdp
  if (batch // accum) % dp:
    raise ConfigError(f'train.batch_size={batch} (micro-batch {batch // accum}) is not divisible by the '
                      f'data-parallel size {dp} (mesh data x fsdp); pick a multiple of {dp * accum}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError on the first field the trainer could not use."""
  check_fields(config)
  for fields, least, what in ((_POSITIVE, 1, 'a positive integer'), (_NON_NEGATIVE, 0, 'an integer >= 0')):
    for field in fields:
      value = get_field(config, field)
      if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ConfigError(f'{field} must be {what}, got {value!r}')
  for field in _BOOLEAN:
    value = get_field(config, field)
    if not isinstance(value, bool):
      raise ConfigError(f'{field} must be true or false, got {value!r}')
  if config.seed >= 2**32:
    raise ConfigError(f'seed must be below 2**32 (JAX takes 32-bit PRNG seeds: larger ones repeat smaller ones), '
                      f'got {config.seed}')
  for field in _FINITE:
    value = get_field(config, field)
    if not is_number(value) or not math.isfinite(value):
      raise ConfigError(f'{field} must be a finite number, got {value!r}')
    if abs(value) > _FLOAT32_MAX:  # the step computes in float32: this would be inf there
      raise ConfigError(f'{field} must be a finite float32 number (at most 3.4e38 in size), got {value!r}')
  for field, choices in _CHOICES.items():
    value = get_field(config, field)
    if value not in choices:
      raise ConfigError(f'{field} must be one of {", ".join(map(repr, choices))}, got {value!r}')
  if not isinstance(config.name, str) or not config.name or config.name in ('.', '..') or '/' in config.name:
    raise ConfigError(f'name must be a plain folder name (the default workdir is runs/<name>), got {config.name!r}')
  t, m = config.train, config.model
  if t.profile_steps and t.profile_start >= t.num_steps:
    raise ConfigError(f'train.profile_start={t.profile_start} is not below train.num_steps={t.num_steps}: the '
                      'trace of train.profile_steps would never start; lower profile_start')
  if not 0.0 <= m.dropout < 1.0:
    raise ConfigError(f'model.dropout must be in [0, 1), got {m.dropout!r}')
  _check_attention_impl(m)
  if t.learning_rate <= 0:
    raise ConfigError(f'train.learning_rate must be > 0, got {t.learning_rate!r}')
  if not 0 <= t.min_learning_rate <= t.learning_rate:
    raise ConfigError(f'train.min_learning_rate must be in [0, train.learning_rate={t.learning_rate}], '
                      f'got {t.min_learning_rate!r}')
  if t.warmup_steps >= t.decay_steps:
    raise ConfigError(f'train.warmup_steps={t.warmup_steps} must be below train.decay_steps={t.decay_steps}; '
                      'shorten the warmup')
  if t.warmup_steps > t.num_steps:
    raise ConfigError(f'train.warmup_steps={t.warmup_steps} is longer than the run '
                      f'(train.num_steps={t.num_steps}); shorten the warmup or train longer')
  for name in ('beta1', 'beta2'):
    if not 0.0 <= t[name] < 1.0:
      raise ConfigError(f'train.{name} must be in [0, 1), got {t[name]!r}')
  if t.weight_decay < 0 or t.grad_clip < 0:
    raise ConfigError('train.weight_decay and train.grad_clip must be >= 0 (0 turns them off)')
  if config.data.source == 'text' and not config.data.text_path:
    raise ConfigError("data.source='text' needs data.text_path; pass --config.data.text_path=/path/to/corpus.txt")
  if config.data.source == 'tfds' and config.data.text_path:
    raise ConfigError(f"data.text_path={config.data.text_path!r} is not read with data.source='tfds' (which reads "
                      "data.tfds_name); pass --config.data.source=text to train on the file, or drop text_path")
  if not 0.0 < config.data.text_eval_fraction < 1.0:
    raise ConfigError(f'data.text_eval_fraction must be in (0, 1), got {config.data.text_eval_fraction!r}')
  for axis in ('data', 'fsdp', 'tensor'):
    size = config.mesh[axis]
    if not isinstance(size, int) or (size <= 0 and size != -1):
      raise ConfigError(f'mesh.{axis} must be a positive integer or -1 (all devices left over), got {size!r}')
  if [config.mesh[a] for a in ('data', 'fsdp', 'tensor')].count(-1) > 1:
    raise ConfigError('only one of mesh.data, mesh.fsdp, mesh.tensor may be -1')
  k = t.steps_per_call
  for field in ('train.num_steps', 'train.log_every', 'eval.every', 'checkpoint.every'):
    if get_field(config, field) % k:
      raise ConfigError(f'{field}={get_field(config, field)} is not a multiple of train.steps_per_call={k}; '
                        'make it one (logs, evaluations and checkpoints happen between calls)')
  if t.batch_size % t.grad_accum_steps:
    raise ConfigError(f'train.batch_size={t.batch_size} is not divisible by train.grad_accum_steps='
                      f'{t.grad_accum_steps}; pick a batch size that the micro-batches divide')
  check_mesh_shape(config, *(max(config.mesh[a], 1) for a in ('data', 'fsdp', 'tensor')))  # -1: checked on the mesh
