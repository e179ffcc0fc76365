"""The optimizer, the compiled train and eval steps, and the training loop."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pathlib
import shlex
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.flatten_util
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging as absl_logging
from flax import nnx
from jax.sharding import PartitionSpec as P

from nanodecoder import checkpoint as checkpoint_lib
from nanodecoder import config as config_lib
from nanodecoder import data as data_lib
from nanodecoder import interrupts
from nanodecoder import sharding as sharding_lib
from nanodecoder import sweep as sweep_lib
from nanodecoder.files import atomic_write
from nanodecoder.metrics import MetricsLogger, flatten_config
from nanodecoder.model import Decoder, ModelConfig, count_params
from nanodecoder.tokenizer import Tokenizer


# Optimizer --------------------------------------------------------------------


def learning_rate_schedule(train: ml_collections.ConfigDict) -> Callable[[Any], Any]:
  """nanoGPT's schedule: linear warmup to the peak, cosine decay to the floor, then flat."""
  peak, floor = train.learning_rate, train.min_learning_rate
  warmup, decay = train.warmup_steps, train.decay_steps

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * (step + 1) / (warmup + 1)
    progress = jnp.clip((step - warmup) / (decay - warmup), 0.0, 1.0)
    cosine = floor + 0.5 * (1.0 + jnp.cos(jnp.pi * progress)) * (peak - floor)
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def make_optimizer(train: ml_collections.ConfigDict, stacked_blocks: bool = False) -> optax.GradientTransformation:
  """AdamW with weight decay on matrices only (embedding tables included, as in nanoGPT; not norms or biases),
  after global-norm clipping.

  With `stacked_blocks` (scanned layers) the parameters under 'blocks' carry
  an extra leading layer axis, which does not make a vector a matrix. Biases
  go by name: the attention's q/k/v bias is [3, N, H].
  """

  def is_matrix(path, p):
    names = [str(getattr(k, 'key', '')) for k in path]
    stacked = stacked_blocks and names[0] == 'blocks'
    return p.ndim - stacked >= 2 and not any(name.endswith('bias') for name in names)

  adamw = optax.adamw(
      learning_rate_schedule(train), b1=train.beta1, b2=train.beta2, weight_decay=train.weight_decay,
      mask=lambda params: jax.tree_util.tree_map_with_path(is_matrix, params))
  # Always chained (an infinite norm never clips): the optimizer state, and so checkpoints, keep one structure.
  return optax.chain(optax.clip_by_global_norm(train.grad_clip or float('inf')), adamw)


# Steps ------------------------------------------------------------------------


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None):
  """Sum of token losses and of their weights; logits [B, T, V] fp32, targets [B, T]."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  if weights is None:
    return losses.sum(), jnp.asarray(losses.size, jnp.float32)
  return (losses * weights).sum(), weights.sum()


@dataclasses.dataclass
class Trainer:
  """The model/optimizer graph, its sharded state, and the compiled steps over one mesh."""

  config: ml_collections.ConfigDict
  model_config: ModelConfig
  mesh: jax.sharding.Mesh
  graphdef: Any
  abstract_state: Any  # nnx.State of (model, optimizer) of ShapeDtypeStructs with their shardings
  state: Any  # the same, of arrays (None until `init_state` or a restore)
  train_step: Callable  # (state, tokens [B, T+1]) -> (state, {'loss', 'grad_norm'})
  train_steps: Callable  # (state, tokens [k, B, T+1]) -> (state, {'loss': [k], 'grad_norm': [k]}): k steps, one call
  eval_step: Callable  # (state[0], tokens [n, B, T+1], weights [n, B, T]) -> (loss sum, weight sum) of n batches
  init_state: Callable[[], Any]

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state[1]['step'][...]))

  def model(self) -> Decoder:
    return nnx.merge(self.graphdef, self.state)[0]


def _create(model_config: ModelConfig, train: ml_collections.ConfigDict, seed: int):
  model = Decoder(model_config, nnx.Rngs(params=seed))
  return model, nnx.Optimizer(model, make_optimizer(train, model_config.scan_layers), wrt=nnx.Param)


def create_trainer(config: ml_collections.ConfigDict, model_config: ModelConfig, mesh: jax.sharding.Mesh,
                   init: bool = True) -> Trainer:
  """The jitted steps for `mesh` (compiled at their first call); with `init`, the parameters built directly in their
  sharded layout."""
  with nnx.use_eager_sharding(False):
    abstract_objects = nnx.eval_shape(lambda: _create(model_config, config.train, config.seed))
  graphdef, abstract_state = nnx.split(abstract_objects)
  model_graphdef = nnx.graphdef(abstract_objects[0])
  state_sharding = sharding_lib.state_shardings(abstract_state, mesh)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract_state, state_sharding)

  def init_state():
    with nnx.use_eager_sharding(False):
      return jax.jit(lambda: nnx.state(_create(model_config, config.train, config.seed)),
                     out_shardings=state_sharding)()

  batch_sharding = sharding_lib.batch_sharding(mesh)
  replicated = sharding_lib.replicated(mesh)
  train_cfg = config.train
  dropout_key = jax.random.key(config.seed + 1) if model_config.dropout > 0 else None
  accum = train_cfg.grad_accum_steps

  # The gradient all-reduced as one flat vector (see `_mean_over_devices`): CPU data-only meshes, no dropout.
  flat_all_reduce = (mesh.devices.flat[0].platform == 'cpu' and model_config.dropout == 0
                     and mesh.shape['data'] > 1 and mesh.shape['fsdp'] == mesh.shape['tensor'] == 1)
  # The residual stream keeps the batch's layout: rows over the batch axes (see Decoder.__call__).
  # (Under `_mean_over_devices` each device runs the model on its own rows: nothing to pin.)
  rows = None if flat_all_reduce else batch_sharding

  def train_step(state, batch):
    """One optimizer step on a [batch, context_length + 1] token batch."""
    model, optimizer = nnx.merge(graphdef, state)
    step_key = None if dropout_key is None else jax.random.fold_in(dropout_key, optimizer.step[...])
    model_graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, rest, tokens, key):
      logits, _ = nnx.merge(model_graph, params, rest)(tokens[:, :-1], dropout_key=key, activation_sharding=rows)
      total, count = cross_entropy(logits, tokens[:, 1:])
      return total / count

    def gradients(params, rest, batch, key=None):
      """(mean loss, its gradient) over `batch`, in `accum` micro-batches."""
      grad_fn = scaled_value_and_grad(loss_fn, loss_scale(model_config))
      if accum == 1:
        return grad_fn(params, rest, batch, key)
      # k micro-batches of b rows each give the gradient of one batch of k * b rows (with dropout, one drawn with
      # other masks: each micro-batch has its own key). Micro-batch j takes rows j, j + k, j + 2k, ...: every
      # device holds a slice of every micro-batch.
      micro = batch.reshape(batch.shape[0] // accum, accum, batch.shape[1]).swapaxes(0, 1)
      if not flat_all_reduce:  # (under shard_map the batch is already this device's rows)
        micro = jax.lax.with_sharding_constraint(micro, sharding_lib.batch_sharding(mesh, batch_dim=1))
      keys = None if key is None else jax.random.split(key, accum)

      def body(carry, xs):
        tokens, key = xs
        return jax.tree.map(jnp.add, carry, grad_fn(params, rest, tokens, key)), None

      zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(body, zeros, (micro, keys))
      return jax.tree.map(lambda x: x / accum, (loss, grads))

    if flat_all_reduce:
      loss, grads = _mean_over_devices(gradients, mesh)(params, rest, batch)
    else:
      loss, grads = gradients(params, rest, batch, step_key)
    grad_norm = optax.tree.norm(grads)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), {'loss': loss, 'grad_norm': grad_norm}

  def train_steps(state, batches):
    """k optimizer steps in one compiled call (fewer host round trips): batches [k, B, T+1]."""
    return jax.lax.scan(train_step, state, batches)

  def eval_step(params, batches, weights):
    """Summed loss and target count of n batches [n, B, T+1] (weights 0 mark padding); needs only the model's
    state (state[0]), not the optimizer's."""
    model = nnx.merge(model_graphdef, params)

    def add(totals, xs):
      tokens, w = xs
      logits, _ = model(tokens[:, :-1], activation_sharding=batch_sharding)
      return jax.tree.map(jnp.add, totals, cross_entropy(logits, tokens[:, 1:], w)), None

    return jax.lax.scan(add, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)), (batches, weights))[0]

  stacked_sharding = sharding_lib.batch_sharding(mesh, batch_dim=1)
  train_step_jit = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding),
                           out_shardings=(state_sharding, replicated), donate_argnums=0)
  train_steps = jax.jit(train_steps, in_shardings=(state_sharding, stacked_sharding),
                        out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_step = jax.jit(eval_step, in_shardings=(state_sharding[0], stacked_sharding, stacked_sharding),
                      out_shardings=(replicated, replicated))
  return Trainer(config, model_config, mesh, graphdef, abstract_state, init_state() if init else None,
                 train_step_jit, train_steps, eval_step, init_state)


# float16 computes the backward pass in float16 too: the gradient of a mean over B * T tokens, ~1 / (B * T) per token
# at the logits and smaller further back, falls below its normal range (6e-5) and loses digits or vanishes (4.6% off
# float32 in a 2-layer model's gradients at 12k tokens per batch; bfloat16 has float32's range). The loss is scaled up
# by this power of two for the backward pass and the float32 gradients scaled back (0.1% off).
FLOAT16_LOSS_SCALE = 2.0 ** 10


def loss_scale(model_config: ModelConfig) -> float:
  return FLOAT16_LOSS_SCALE if jnp.dtype(model_config.dtype) == jnp.float16 else 1.0


def scaled_value_and_grad(loss_fn: Callable, scale: float) -> Callable:
  """jax.value_and_grad of `loss_fn` (of its first argument) computed on `loss_fn * scale`, then divided by it."""
  if scale == 1.0:
    return jax.value_and_grad(loss_fn)
  scaled = jax.value_and_grad(lambda *args: loss_fn(*args) * scale)
  return lambda *args: jax.tree.map(lambda x: x / scale, scaled(*args))


def _mean_over_devices(gradients: Callable, mesh: jax.sharding.Mesh) -> Callable:
  """`gradients(params, rest, batch) -> (loss, grads)` run by each device on its rows of the batch,
  then averaged over the devices with one all-reduce of all gradients flattened into a single vector.

  Left to GSPMD, the all-reduce takes the gradients as a tuple, which XLA's CPU runtime reduces one
  array at a time (~45 us each: 1.7 ms of the CPU recipe's 17 ms step for its 27 arrays; the same
  bytes as one array take 0.4 ms). For CPU meshes whose only parallelism is over data (every
  parameter replicated), without dropout (its random bits would then depend on the device count).
  Not on accelerators: there XLA overlaps the per-layer all-reduces with the backward pass.
  """
  batch_axes = sharding_lib.BATCH_AXES

  def per_device(params, rest, batch):
    loss, grads = gradients(params, rest, batch)
    flat, unravel = jax.flatten_util.ravel_pytree(grads)
    loss, flat = jax.lax.pmean((loss, flat), batch_axes)  # equal rows per device: the mean of means
    return loss, unravel(flat)

  # check_vma=False: inside, gradients are this device's own (the explicit pmean reduces them).
  return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P(batch_axes)), out_specs=P(), check_vma=False)


# Evaluation -------------------------------------------------------------------


EVAL_BATCHES_PER_CALL = 16  # at most this many evaluation batches scanned in one compiled call


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
  """`array` with zero rows appended up to a multiple of `multiple` rows."""
  return np.concatenate([array, np.zeros((-len(array) % multiple, *array.shape[1:]), array.dtype)])


def _mean_loss(trainer: Trainer, tokens: np.ndarray, weights: np.ndarray, params=None) -> tuple[float, float]:
  """(mean loss, target count) over batches tokens [n, B, T+1] with weights [n, B, T], a few per call, of the
  model with `params` (default: the trainer's, state[0]).

  The last call is padded with zero-weight batches so that every call has the same shape.
  """
  params = trainer.state[0] if params is None else params
  calls = -(-len(tokens) // EVAL_BATCHES_PER_CALL)
  per_call = -(-len(tokens) // calls)  # as even as calls allow: 20 batches run as 2 x 10, not 2 x 16
  tokens, weights = _pad_rows(tokens, per_call), _pad_rows(weights, per_call)
  sharding = sharding_lib.batch_sharding(trainer.mesh, batch_dim=1)
  total = count = 0.0
  for i in range(0, len(tokens), per_call):
    chunk = lambda array: sharding_lib.put_batch(lambda rows: array[i:i + per_call, rows], sharding,
                                                 (per_call, *array.shape[1:]), batch_dim=1)
    loss_sum, weight_sum = trainer.eval_step(params, chunk(tokens), chunk(weights))
    total += float(loss_sum)  # one host sync per call
    count += float(weight_sum)
  return total / count, count


def window_loss(trainer: Trainer, tokens: np.ndarray, params=None) -> tuple[float, float]:
  """Exact (mean loss, target count) over every window of `tokens` (each target predicted once), of the model
  with `params` (default: the trainer's)."""
  batch_size, context = trainer.config.train.batch_size, trainer.model_config.context_length
  windows, weights = data_lib.all_windows(tokens, context)
  windows, weights = _pad_rows(windows, batch_size), _pad_rows(weights, batch_size)
  return _mean_loss(trainer, windows.reshape(-1, batch_size, context + 1), weights.reshape(-1, batch_size, context),
                    params)


def evaluate(trainer: Trainer, dataset: data_lib.Dataset) -> dict[str, float]:
  """Mean loss over `eval.batches` fixed batches of train and eval text (eval: every window if asked)."""
  config = trainer.config
  batch_size, window = config.train.batch_size, dataset.context_length + 1
  results = {}
  for split in ('train', 'eval'):
    if split == 'eval' and config.eval.all_windows:
      results['eval_loss'] = window_loss(trainer, dataset.eval_tokens)[0]
    else:
      tokens = np.stack([dataset.eval_batch(split, config.seed, i, batch_size) for i in range(config.eval.batches)])
      results[f'{split}_loss'] = _mean_loss(trainer, tokens, np.ones((*tokens.shape[:2], window - 1), np.float32))[0]
  return results


# Loop -------------------------------------------------------------------------


def train_batches(dataset: data_lib.Dataset, mesh: jax.sharding.Mesh, seed: int, batch_size: int, step: int,
                  n: int = 1) -> jax.Array:
  """The token windows of steps step .. step + n - 1 on `mesh`: [B, T+1] (n = 1, for `train_step`) or
  [n, B, T+1] (for `train_steps`); this process builds only its own rows."""
  shape = (batch_size, dataset.context_length + 1)
  if n == 1:
    return sharding_lib.put_batch(lambda rows: dataset.train_batch(seed, step, batch_size, rows),
                                  sharding_lib.batch_sharding(mesh), shape)
  return sharding_lib.put_batch(
      lambda rows: np.stack([dataset.train_batch(seed, s, batch_size, rows) for s in range(step, step + n)]),
      sharding_lib.batch_sharding(mesh, batch_dim=1), (n, *shape), batch_dim=1)


def check_mesh_fits(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """ConfigError unless `config` can train on `mesh`: its attention runs on these devices, its axes divide."""
  device = mesh.devices.flat[0]
  platform = device.platform
  reason = config_lib.attention_cannot_run(config.model, platform, getattr(device, 'compute_capability', None))
  if reason:
    raise config_lib.ConfigError(reason)
  try:
    config_lib.check_mesh_shape(config, *(mesh.shape[axis] for axis in sharding_lib.AXES))
  except config_lib.ConfigError as e:
    if platform == 'cpu' and config.mesh.cpu_devices:
      raise config_lib.ConfigError(f'{e} (or lower mesh.cpu_devices={config.mesh.cpu_devices}, the number of '
                                   'host devices the mesh spans)') from None
    if platform == 'cpu' and jax.process_count() > 1:  # each process chose its own count, one device per core
      raise config_lib.ConfigError(f'{e} (or set mesh.cpu_devices, the host devices of each process: now '
                                   f'{mesh.devices.size // jax.process_count()}, one per core)') from None
    raise


class StopRequest:
  """Turns SIGTERM / SIGINT into a request to stop after the current step (a second Ctrl-C aborts)."""

  def __init__(self):
    self.signal: int | None = None
    self._ctrl_c = False
    self._previous = {}

  def __enter__(self):
    interrupts.check()  # a Ctrl-C before training that Python dropped stops the run now
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    self._verbosity = absl_logging.get_verbosity()
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    absl_logging.set_verbosity(self._verbosity)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self._ctrl_c:
      absl_logging.set_verbosity(absl_logging.FATAL)  # Orbax logs the interrupted save as an error: the user knows
      raise KeyboardInterrupt
    self._ctrl_c = self._ctrl_c or signum == signal.SIGINT
    self.signal = self.signal or signum  # the first signal names the stop (and the exit status)

  def name(self) -> str:
    return signal.Signals(self.signal).name if self.signal else 'a signal to another process'

  def requested(self) -> bool:
    """True on every process as soon as any process was signalled."""
    if interrupts.take():  # a Ctrl-C that Python dropped (see nanodecoder.interrupts): a stop, or the abort
      self._handle(signal.SIGINT, None)
    return bool(sharding_lib.gather_from_processes(self.signal is not None).any())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       while_locked: Callable[[], contextlib.AbstractContextManager] | None = None) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Returns the last evaluation's metrics, plus 'stopped_by' (a signal name)
  when a signal ended the run early after saving a checkpoint. Process 0
  enters a `while_locked()` context once this run holds the workdir (before
  any step) and leaves it, with whatever ended the session, before releasing it.
  """
  _check_same_config_on_every_process(config)
  config_lib.validate(config)
  workdir = pathlib.Path(workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  check_mesh_fits(config, mesh)
  is_main = jax.process_index() == 0
  lock = checkpoint_lib.WorkdirLock(workdir)
  try:
    with contextlib.ExitStack() as locked:  # (left before the lock is released)
      on_locked = None if while_locked is None else lambda: locked.enter_context(while_locked())
      dataset = _load_data_and_lock(config, lock, is_main, workdir, on_locked)
      with StopRequest() as stop:
        return _train(_Session(config, dataset, mesh, workdir, is_main, stop))
  finally:
    lock.release()


# Fields that may differ between processes: where each host keeps its copy of the data (the data itself is compared),
# and how each splits its CPU into devices (the device counts are compared).
_PER_PROCESS_FIELDS = ('data.text_path', 'data.manual_dir', 'data.tfds_data_dir', 'mesh.cpu_devices')


def _check_same_config_on_every_process(config: ml_collections.ConfigDict) -> None:
  """Refuses processes started with other settings than process 0's (each would compile its own step: e.g. another
  learning rate trains a model of neither). Before validation: a config refused on one process alone would leave
  the others waiting for it at a collective. A collective, with several processes."""
  if jax.process_count() == 1:
    return
  sharding_lib.check_devices_per_process(jax.devices())  # (the collectives below need equal counts)
  values = flatten_config(json.loads(config.to_json()))
  differing = lambda fields: sharding_lib.first_process_differing(
      sharding_lib.digest(json.dumps([values.get(f) for f in fields]).encode()))
  fields = sorted(config_lib.FIELDS.difference(_PER_PROCESS_FIELDS))
  if differing(fields) is None:
    return
  for field in fields:  # which field: one collective per field, as far as the first that differs
    other = differing([field])
    if other is not None:
      raise config_lib.ConfigError(f'process {other} has another {field} than process 0 (this process: '
                                   f'{values.get(field)!r}); start every process with the same --config and '
                                   'overrides')
  raise config_lib.ConfigError('the processes have other configs than process 0; start every process with the same '
                               '--config and overrides')


def _kept_tokenizer(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Tokenizer | None:
  """The BPE merges of the run in `workdir` when it has checkpoints: its model was trained on their tokens, so its
  text is encoded with them, also other text named on purpose (learned on that, merges would differ; text edited in
  place is then told by its fingerprint). None for a new run or one without merges (learned from the data; a
  checkpoint of other tokens or another data.vocab_size is refused on restore)."""
  if not config.data.vocab_size or not sweep_lib.saved_steps(workdir):
    return None
  tokenizer = checkpoint_lib.run_tokenizer(workdir)
  return tokenizer if tokenizer is not None and tokenizer.merges else None


def _load_data_and_lock(config: ml_collections.ConfigDict, lock: checkpoint_lib.WorkdirLock, is_main: bool,
                        workdir: pathlib.Path, on_locked: Callable[[], None] | None = None) -> data_lib.Dataset:
  """Process 0 loads the data (e.g. a TFDS download) and locks the workdir, then the others load the data
  (encoded with the run's BPE merges if it has them: _kept_tokenizer).

  The data comes first: bad data leaves nothing behind. Every process raises if any of them failed.
  """
  dataset = failure = None
  if is_main:
    try:
      dataset = data_lib.load_dataset(config, tokenizer=_kept_tokenizer(config, workdir))
      lock.acquire()
      lock.check_paths(profiling=config.train.profile_steps > 0)
      if on_locked is not None:
        on_locked()
    except Exception as e:  # noqa: BLE001 (raised below, on every process)
      failure = e
  _raise_on_every_process(failure, 'to load the data or lock the workdir')
  if not is_main:
    try:
      dataset = data_lib.load_dataset(config, tokenizer=_kept_tokenizer(config, workdir))
    except Exception as e:  # noqa: BLE001
      failure = e
  _raise_on_every_process(failure, 'to load the data')
  # Each process reads its own copy of the data: they must agree, or the rows they feed come from other texts.
  other = sharding_lib.first_process_differing(dataset.fingerprint())
  if other is not None:
    raise data_lib.DataError(f'process {other} read other data than process 0 (another text or tokenizer); give '
                             'every process the same data files')
  lock.check_shared()
  return dataset


# The error kinds a failed process passes to the others (by index; any other is a RuntimeError there).
_SHARED_ERRORS = (config_lib.ConfigError, data_lib.DataError, checkpoint_lib.CheckpointError, RuntimeError)


def _raise_on_every_process(failure: Exception | None, what: str) -> None:
  """Raises `failure`, and on the other processes an error of its kind naming the failed process.

  With several processes a collective that every process calls, so none waits forever for a failed one.
  """
  kind = 0 if failure is None else 1 + next(
      (i for i, cls in enumerate(_SHARED_ERRORS) if isinstance(failure, cls)), len(_SHARED_ERRORS) - 1)
  kinds = sharding_lib.gather_from_processes(kind)
  if failure is not None:
    raise failure
  if kinds.any():
    failed = int(np.flatnonzero(kinds)[0])
    raise _SHARED_ERRORS[kinds[failed] - 1](f'process {failed} failed {what} (its error is in its output); '
                                           f'process {jax.process_index()} stops too')


def _restore_or_init(trainer: Trainer, checkpoints, dataset: data_lib.Dataset, log) -> dict[str, Any]:
  """Fills `trainer.state` from the latest good checkpoint, or fresh; returns the metrics known so far."""
  config = trainer.config
  restored = checkpoints.restore_latest_good(trainer.abstract_state, config, log=log, tokenizer=dataset.tokenizer)
  if restored is None:
    trainer.state = trainer.init_state()
    return {}
  step, trainer.state, meta = restored
  _check_same_text(meta, config, dataset, step, checkpoints.directory)
  log(f'resumed from the checkpoint at step {step} in {checkpoints.directory}')
  if step < config.train.num_steps:
    return {}
  log(f'the latest checkpoint (step {step}) is at or past train.num_steps={config.train.num_steps}; nothing to do '
      '(raise train.num_steps to train further)')
  return {} if meta['val_loss'] is None else {'val_loss': meta['val_loss']}


def _check_same_text(meta: dict, config: ml_collections.ConfigDict, dataset: data_lib.Dataset, step: int,
                     directory) -> None:
  """A run resumes on the text it trained on, unless its config names other data (on purpose): a text file
  edited in place, with the same characters, would otherwise be trained on silently."""
  saved = meta.get('data_fingerprint')  # (none in checkpoints written before it was recorded)
  changes = config_lib.changes_on_resume(ml_collections.ConfigDict(meta['config']), config)
  if saved is None or saved == dataset.fingerprint() or any(field.startswith('data.') for field, _, _ in changes):
    return
  data = config.data
  source = f'data.text_path {data.text_path!r}' if data.source == 'text' else f'tfds {data.tfds_name!r}'
  on_purpose = (f'; or, to train this run on it on purpose, copy it to a new file and name that: --workdir '
                f'{shlex.quote(str(directory.parent))} --config.data.text_path=NEW_FILE' if data.source == 'text' else '')
  raise data_lib.DataError(f'{source} holds other text than the checkpoint at step {step} in {directory} was '
                           'trained on (with the same characters); put that text back, or train on this one in '
                           f'another --workdir{on_purpose}')


@dataclasses.dataclass(frozen=True)
class _Session:
  """What one process's training session works with."""

  config: ml_collections.ConfigDict
  dataset: data_lib.Dataset
  mesh: jax.sharding.Mesh
  workdir: pathlib.Path
  is_main: bool  # process 0: the one that logs and writes the workdir's files (checkpoints: every process)
  stop: StopRequest


def _train(session: _Session) -> dict[str, Any]:
  """Opens the session's logs and checkpoints for `_train_loop`, and closes them however it ends."""
  config, ck = session.config, session.config.checkpoint
  logger = MetricsLogger(session.workdir, enabled=session.is_main, total_steps=config.train.num_steps, config=config)
  checkpoints = checkpoint_lib.Checkpoints(session.workdir, keep=ck.keep, keep_best=ck.keep_best,
                                           async_save=ck.async_save)
  try:
    return _train_loop(session, logger, checkpoints)
  finally:
    checkpoints.close()
    logger.close()


def _train_loop(session: _Session, logger: MetricsLogger, checkpoints: checkpoint_lib.Checkpoints) -> dict[str, Any]:
  """Trains from the latest checkpoint to train.num_steps, logging, evaluating and saving on the way; a signal
  stops it after the current call, saved. Returns the last evaluation's metrics (see train_and_evaluate)."""
  config, dataset, t = session.config, session.dataset, session.config.train
  trainer, metrics = _start_session(session, logger, checkpoints)
  saver = _Saver(trainer, checkpoints, dataset)
  batches = lambda step, n: train_batches(dataset, session.mesh, config.seed, t.batch_size, step, n)
  schedule = learning_rate_schedule(t)

  step = start_step = trainer.step
  n = _call_size(step, t.steps_per_call)
  batch = batches(step, n) if step < t.num_steps else None
  speed = _Speed(t.batch_size * dataset.context_length)
  compiling = True  # the first call of each size compiles: left out of the speed
  # (one trace file: process 0's)
  profile = _Profile(session.workdir, t.profile_start, t.profile_steps if session.is_main else 0, logger.info)
  try:
    while step < t.num_steps:
      profile.before(step, n)
      trainer.state, out = (trainer.train_step if n == 1 else trainer.train_steps)(trainer.state, batch)
      next_n = _call_size(step + n, t.steps_per_call)
      if step + n < t.num_steps:
        batch = batches(step + n, next_n)  # prepared while the device works
      # Block on every call (queued collectives can starve). A finite loss with an infinite gradient still
      # makes NaN parameters: both must be finite before a checkpoint can hold them.
      losses, grad_norms = map(np.atleast_1d, jax.device_get((out['loss'], out['grad_norm'])))
      _raise_if_diverged(losses, grad_norms, step, saver.last_saved)
      step += n
      profiled = profile.tracing
      profile.after(step)
      if compiling and step == start_step + n:
        logger.info(f'step {step}: compiled and ran the first call in {speed.elapsed():.1f} s')
      speed.add(n, timed=not (compiling or profiled))
      compiling, n = next_n != n, next_n

      logged = step % t.log_every == 0 or step == t.num_steps
      if logged:
        speeds = speed.scalars()  # before the learning rate, whose first evaluation on the host compiles
        logger.write(step, {'train/loss': float(losses[-1]), 'train/lr': float(schedule(step - 1)),
                            'train/grad_norm': float(grad_norms[-1]), **speeds})
      val_loss = None
      if step % config.eval.every == 0 or step == t.num_steps:
        metrics = _evaluate_and_log(trainer, dataset, logger, step)
        val_loss = metrics['val_loss']
      saved = step % config.checkpoint.every == 0 or step == t.num_steps
      if saved:
        started = time.perf_counter()
        saver.save(step, val_loss)
        logger.took('checkpoint', step, time.perf_counter() - started, config.checkpoint.every)  # for the ETA
      if step < t.num_steps and session.stop.requested():
        if not saved:
          saver.save(step, val_loss)
        checkpoints.wait()
        metrics['stopped_by'] = session.stop.name()
        logger.info(f'stopped by {metrics["stopped_by"]} after step {step}; checkpoint saved, '
                    'run the same command to resume')
        return metrics
      if logged or val_loss is not None or saved:
        speed.restart()
    checkpoints.wait()  # the last save is on disk (a failed asynchronous save surfaces here)
  finally:
    profile.after(None)
  return metrics


def _start_session(session: _Session, logger: MetricsLogger,
                   checkpoints: checkpoint_lib.Checkpoints) -> tuple[Trainer, dict[str, Any]]:
  """The session's trainer, restored from the latest good checkpoint or fresh, and the metrics known so far.

  Logs the model and the data's warnings first; records the run's config and tokenizer in the workdir.
  """
  config, dataset, mesh = session.config, session.dataset, session.mesh
  model_config = config_lib.model_config(config, dataset.tokenizer.vocab_size)
  trainer = create_trainer(config, model_config, mesh, init=False)
  abstract_model = nnx.merge(trainer.graphdef, trainer.abstract_state)[0]  # (shapes only: the state comes next)
  layers = f'{model_config.num_layers} layer' + ('s' if model_config.num_layers != 1 else '')
  tokenizer = dataset.tokenizer
  merges = f' ({len(tokenizer.chars)} characters + {len(tokenizer.merges)} BPE merges)' if tokenizer.merges else ''
  logger.info(f'model: {count_params(abstract_model):,} parameters, {layers}, '
              f'{model_config.num_heads} heads x {model_config.head_size} = {model_config.embed_dim} wide, '
              f'vocab {model_config.vocab_size}{merges}; mesh {dict(mesh.shape)} on {jax.device_count()} '
              f'{jax.devices()[0].platform} devices')
  if config.data.vocab_size > tokenizer.vocab_size:
    logger.info(f'warning: data.vocab_size={config.data.vocab_size} tokens, but after {len(tokenizer.merges)} BPE '
                f'merges no pair of tokens occurs twice in data.train_split: the vocabulary has {tokenizer.vocab_size}')
  shared = data_lib.shared_splits(config.data)
  if shared:
    logger.info(f'warning: data.eval_split={config.data.eval_split!r} holds text the run trains on '
                f'({", ".join(map(repr, shared))}, also in data.train_split): its val loss measures fit, not '
                'generalization')
  metrics = _restore_or_init(trainer, checkpoints, dataset, logger.info)
  logger.start(trainer.step)
  if trainer.step >= config.train.num_steps:  # nothing to do: records a crashed session logged past the checkpoint go
    logger.drop_replaced()
  elif session.is_main:  # (a session training nothing keeps the run's config)
    atomic_write(session.workdir / config_lib.SAVED_CONFIG, config.to_json(indent=2))
    atomic_write(session.workdir / 'tokenizer.json', dataset.tokenizer.to_json())
  return trainer, metrics


def _call_size(step: int, steps_per_call: int) -> int:
  """Steps in the compiled call from `step`: steps_per_call, or single steps to realign an odd resume.

  (config validation makes num_steps a multiple of steps_per_call: an aligned call never passes the end)
  """
  return steps_per_call if step % steps_per_call == 0 else 1


def _evaluate_and_log(trainer: Trainer, dataset: data_lib.Dataset, logger: MetricsLogger,
                      step: int) -> dict[str, float]:
  """Evaluates the trainer at `step` and logs it (its time counts in the ETA); returns the train and val loss.

  Also the val loss in bits per character (with BPE merges estimated with the eval text's characters per token):
  comparable across tokenizers, unlike nats per token.
  """
  started = time.perf_counter()
  result = evaluate(trainer, dataset)
  logger.took('evaluation', step, time.perf_counter() - started, trainer.config.eval.every)  # for the ETA
  metrics = {'train_loss': result['train_loss'], 'val_loss': result['eval_loss'],
             'val_bits_per_char': result['eval_loss'] / dataset.eval_characters_per_token() / math.log(2)}
  logger.write(step, {f'eval/{name}': value for name, value in metrics.items()})
  return metrics


class _Saver:
  """Saves the trainer's state, with what a resume and sampling need, after checking it is good to keep."""

  def __init__(self, trainer: Trainer, checkpoints: checkpoint_lib.Checkpoints, dataset: data_lib.Dataset):
    self.trainer, self.checkpoints, self.dataset = trainer, checkpoints, dataset
    self.last_saved = trainer.step or None  # the last good checkpoint: the one restored (never one at step 0)
    self._fingerprint = dataset.fingerprint()  # a resumed run checks it trains on the same text

  def save(self, step: int, val_loss: float | None) -> None:
    _check_savable(self.trainer, step, val_loss, self.last_saved)
    self.checkpoints.save(step, self.trainer.state, self.trainer.config, self.dataset.tokenizer, val_loss,
                          data_fingerprint=self._fingerprint)
    self.last_saved = step


def _raise_if_diverged(losses: np.ndarray, grad_norms: np.ndarray, step: int, last_saved: int | None) -> None:
  """Stops at the first of the steps after `step` whose loss or gradient norm is not finite."""
  bad = np.flatnonzero(~(np.isfinite(losses) & np.isfinite(grad_norms)))
  if bad.size:
    i = bad[0]
    name, value = ('loss', losses[i]) if not np.isfinite(losses[i]) else ('gradient norm', grad_norms[i])
    raise _diverged(f'{name} became {value}', step + i + 1, last_saved)


@jax.jit
def _all_finite(params) -> jax.Array:
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(params)]))


def _check_savable(trainer: Trainer, step: int, val_loss: float | None, last_saved: int | None) -> None:
  """Refuses to save a model that diverged where the step's loss and gradient norm did not show it (they come
  from before the update: a huge learning rate makes finite ones and infinite parameters)."""
  if val_loss is not None and not np.isfinite(val_loss):
    what = f'val loss became {val_loss}'
  elif not jax.device_get(_all_finite(trainer.state[0])):
    what = 'parameters became inf or nan'
  else:
    return
  raise _diverged(what, step, last_saved)


def _diverged(what: str, step: int, last_saved: int | None) -> FloatingPointError:
  kept = 'no checkpoint was written' if last_saved is None else f'the last good checkpoint (step {last_saved}) is kept'
  return FloatingPointError(f'{what} at step {step}; {kept}; lower train.learning_rate or check the data')


class _Speed:
  """Milliseconds per step and tokens per second over the calls since the window last restarted (at each log line,
  evaluation and checkpoint), leaving out calls that compiled or ran under the profiler."""

  def __init__(self, tokens_per_step: int):
    self.tokens_per_step = tokens_per_step
    self.restart()

  def restart(self) -> None:
    self.start, self.steps = time.perf_counter(), 0

  def elapsed(self) -> float:
    return time.perf_counter() - self.start

  def add(self, steps: int, timed: bool = True) -> None:
    """Counts a call of `steps` steps just finished; an untimed one (it compiled, or ran under the profiler, which
    slows it) restarts the window instead."""
    if timed:
      self.steps += steps
    else:
      self.restart()

  def scalars(self) -> dict[str, float]:
    """The speed over the window; none before a call that did not compile has finished."""
    if not self.steps:
      return {}
    elapsed = self.elapsed()
    return {'train/ms_per_step': 1000 * elapsed / self.steps,
            'train/tokens_per_s': self.tokens_per_step * self.steps / elapsed}


class _Profile:
  """A jax.profiler trace of steps [start, start + steps) (whole compiled calls), for TensorBoard/Perfetto."""

  def __init__(self, workdir: pathlib.Path, start: int, steps: int, log: Callable[[str], None]):
    self.directory, self.start, self.end, self.log = pathlib.Path(workdir), start, start + steps, log
    self.state = 'waiting' if steps else 'off'  # -> 'tracing' -> 'done'
    self.first = start

  @property
  def tracing(self) -> bool:
    return self.state == 'tracing'

  def before(self, step: int, n: int) -> None:
    """Starts the trace if the call about to run (steps step + 1 .. step + n) holds a step of the window."""
    if self.state != 'waiting':
      return
    if step >= self.end:  # resumed past the window
      self.state = 'done'
    elif step + n > self.start:
      jax.profiler.start_trace(str(self.directory), create_perfetto_trace=True)
      self.state, self.first = 'tracing', step

  def after(self, step: int | None) -> None:
    """Stops the trace once `step` steps are done (None: the run is ending)."""
    if self.state == 'tracing' and (step is None or step >= self.end):
      jax.profiler.stop_trace()
      self.state = 'done'
      last = 'the end' if step is None else step
      self.log(f'profiled steps {self.first + 1}..{last} into {self.directory / "plugins" / "profile"} '
               '(TensorBoard profile tab, or its .trace.json.gz in ui.perfetto.dev)')
