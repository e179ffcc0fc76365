"""Everything about device meshes and how arrays are laid out on them.

The mesh has three axes:
  data    copies of the model, each on a slice of the batch;
  fsdp    slices of the batch *and* of every parameter's 'embed' dimension
          (fully-sharded data parallel: parameters are gathered per layer);
  tensor  slices of the attention heads and the feed-forward width.

Model parameters carry logical axis names (see nanodecoder.model); RULES maps
them to mesh axes, and dimensions without a rule (vocabulary, head size, norms,
stacked layers) are replicated. `logical_spec` also replicates a dimension
that its mesh axis does not divide; training refuses such meshes up front
instead (config.check_mesh_shape checks the heads, feed-forward and embedding
widths).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import math
import os
import re
import socket
import sys
import threading
import zlib

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nanodecoder import interrupts
from nanodecoder.config import ConfigError, check_mesh_shape, validate

AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# logical axis name of a parameter dimension -> mesh axis; names not listed are replicated.
RULES = {
    'embed': 'fsdp',
    'heads': 'tensor',
    'mlp': 'tensor',
}


def forced_cpu_device_count() -> int | None:
  """The CPU device count that XLA_FLAGS sets (--xla_force_host_platform_device_count=N; the last one wins), if any."""
  counts = re.findall(r'--xla_force_host_platform_device_count=(\d+)', os.environ.get('XLA_FLAGS', ''))
  return int(counts[-1]) if counts else None


def set_cpu_devices(count: int, asked: int = 0) -> None:
  """Splits the host CPU into `count` devices; call before JAX starts.

  XLA's CPU backend runs the small operations of these models on few threads;
  a data-parallel mesh over one device per core keeps every core busy.
  XLA_FLAGS that set the count (as the tests do) win; `asked`, a config's
  mesh.cpu_devices, is then refused if it is another count (0: none asked).
  """
  forced = forced_cpu_device_count()
  if forced is None:
    jax.config.update('jax_num_cpu_devices', count)
  elif isinstance(asked, int) and asked > 0 and asked != forced:  # (a bad value: validation names it)
    raise ConfigError(f'mesh.cpu_devices={asked} asks for another CPU device count than XLA_FLAGS, whose '
                      f'--xla_force_host_platform_device_count={forced} wins; drop one of the two')


def cpu_device_count(config: ml_collections.ConfigDict, cores: int) -> int:
  """`mesh.cpu_devices`, or for 0 one device per core, fewer where the mesh cannot be split that many ways.

  With a -1 mesh axis this is the most devices, up to `cores`, over which the heads, widths and batch split
  (the CPU recipe's batch of 12 takes 6 of 8 cores, not 8); a mesh without -1 gets the devices it names if
  the cores suffice. Counts one process's devices: a run of several processes sets mesh.cpu_devices itself.
  """
  if config.mesh.cpu_devices:
    return config.mesh.cpu_devices
  try:
    validate(config)  # (the search below divides by the sizes)
  except ConfigError:
    return cores  # training refuses the config in one line, once all processes have joined
  sizes = [config.mesh[axis] for axis in AXES]
  known = math.prod(size for size in sizes if size != -1)
  if -1 not in sizes:
    return known if known <= cores else cores  # too many: the mesh check at training start says so
  for count in range(cores - cores % known, 0, -known):
    try:
      check_mesh_shape(config, *(count // known if size == -1 else size for size in sizes))
    except ConfigError:
      continue
    return count
  return cores  # nothing fits: the mesh check at training start says why


def usable_cores() -> int:
  """The cores this process may run on (its CPU affinity: taskset, cgroups, SLURM's --cpus-per-task)."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def _cluster_detected() -> bool:
  """A launcher that JAX recognises started several processes of this program: SLURM's srun, Open MPI up to
  version 4, a multi-host TPU slice on GKE. (On Cloud TPU VMs JAX reads the slice from the VM's metadata:
  `--distributed=on`.)"""
  env = os.environ
  srun_step = 'SLURM_STEP_NODELIST' in env  # started by srun: not a lone process in an allocation of several tasks
  if int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1 and 'OMPI_MCA_orte_hnp_uri' not in env:
    raise ConfigError('Open MPI 5 started this program, which JAX does not detect; run one process per node with '
                      '--coordinator_address=HOST0:PORT --num_processes=$OMPI_COMM_WORLD_SIZE '
                      '--process_id=$OMPI_COMM_WORLD_RANK')
  return ((srun_step and int(env.get('SLURM_NTASKS', '1')) > 1) or int(env.get('OMPI_COMM_WORLD_SIZE', '1')) > 1
          or len(env.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1)


# JAX's own deadline for joining comes this long after --distributed_timeout, so that this module's one error
# line comes first: JAX does not raise at its deadline but aborts the process (a C++ check failure and its stack).
JAX_DEADLINE_MARGIN_S = 10


def initialize_distributed(mode: str = 'auto', coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           timeout: int = 300) -> bool:
  """Joins the processes of a multi-host job with `jax.distributed.initialize`; True if it did.

  mode 'auto' joins when any of the three is given or a cluster launcher is
  detected; 'on' always (JAX fills in what is not given from SLURM, Open MPI,
  Kubernetes or Cloud TPU variables); 'off' never. Must run before JAX starts.
  Says on stderr what it waits for; if not every process has joined after
  `timeout` seconds (--distributed_timeout), prints one error line and ends
  the process (status 2). Ctrl-C meanwhile exits at once (status 130).
  """
  if timeout <= 0:
    raise ConfigError(f'--distributed_timeout={timeout} must be positive: the seconds to wait for every process '
                      'to join')
  asked = (coordinator_address, num_processes, process_id) != (None, None, None)
  if mode == 'off' and asked:  # they would be ignored: each process would train alone
    raise ConfigError('--distributed=off runs this process alone, but --coordinator_address, --num_processes or '
                      '--process_id asks to join others; remove them, or drop --distributed=off')
  if mode == 'off' or (mode == 'auto' and not asked and not _cluster_detected()):
    return False
  if num_processes is not None and num_processes < 1:
    raise ConfigError(f'--num_processes={num_processes} must be at least 1: the processes of the job, all hosts')
  if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
    among = f' below --num_processes={num_processes} (0 to {num_processes - 1})' if num_processes else ''
    raise ConfigError(f'--process_id={process_id} must be a number >= 0{among}: this process\'s place in the job, '
                      '0 on the coordinator\'s host')
  host, _, port = (coordinator_address or '').rpartition(':')
  if coordinator_address is not None and not (host and port.isdigit() and 0 < int(port) < 65536):
    raise ConfigError(f'--coordinator_address={coordinator_address} is not HOST:PORT; give process 0\'s host and a '
                      'free port on it, e.g. --coordinator_address=10.0.0.1:1234')  # (JAX: an IndexError, or a wait)
  if process_id == 0 and coordinator_address is not None and 'JAX_COORDINATOR_BIND_ADDRESS' not in os.environ:
    _check_port_free(int(port), coordinator_address)
  address = coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')  # (which JAX reads too)
  through = f'through {address}' if address else "through the coordinator that JAX finds in the cluster's settings"
  processes = f'{num_processes} process{"es" * (num_processes != 1)}' if num_processes else 'the other processes'
  role = '' if process_id is None else f' as process {process_id}'
  print(f'joining {processes} {through}{role} (waiting up to {timeout} s; --distributed_timeout)', file=sys.stderr,
        flush=True)
  every = f'all {num_processes} processes' if (num_processes or 0) > 1 else 'every process'
  timed_out = (f'the processes did not all join {through} within {timeout} s (--distributed_timeout); check that '
               f'{address or "its address"} is process 0\'s host and a port reachable from here, that {every} '
               'started, or raise --distributed_timeout')
  try:
    with interrupts.exit_on_ctrl_c(), _exit_after(timeout, timed_out):
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id, initialization_timeout=timeout + JAX_DEADLINE_MARGIN_S)
  except ValueError as e:  # what JAX could not fill in, e.g. no launcher it knows and too few flags
    raise ConfigError(f'jax.distributed.initialize: {" ".join(str(e).split()).rstrip(".")}; pass --coordinator_address, '
                      '--num_processes and --process_id (or --distributed=off for one process)') from None
  except jax.errors.JaxRuntimeError as e:  # e.g. process 0 could not listen on the port (taken since the check)
    raise ConfigError(f'cannot join {through}: {" ".join(str(e).split())}; check that no other program (an '
                      'earlier run?) uses its port on process 0\'s host, or choose another port') from None
  return True


def _check_port_free(port: int, coordinator_address: str) -> None:
  """Process 0's coordinator will listen on `port` of every address of this host ([::]:port, as JAX binds it).
  Taken, JAX raises a JaxRuntimeError or crashes (a segmentation fault: 3 times in 10 here)."""
  try:
    listener = socket.socket(socket.AF_INET6)
  except OSError:  # no IPv6 here: JAX meets what it meets
    return
  with listener:
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a past run's closed connections
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # the IPv4 addresses too
    try:
      listener.bind(('::', port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise ConfigError(f'port {port} of --coordinator_address={coordinator_address} is in use on this host, where '
                          'process 0 serves it: another program (an earlier run?) holds it; stop it or choose '
                          'another port') from None


@contextlib.contextmanager
def _exit_after(seconds: float, message: str):
  """Within it, `seconds` later, prints 'error: `message`' and ends the process with status 2, as cli.fail would.

  For a call that holds the main thread in C++, where Python cannot interrupt it: JAX's distributed client, which
  at its own deadline aborts the process with a C++ stack trace. From another thread only os._exit ends the process.
  """
  left = threading.Event()

  def watch():
    if left.wait(seconds):
      return
    for stream, text in ((sys.stdout, ''), (sys.stderr, f'error: {message}\n')):
      try:
        stream.write(text)
        stream.flush()
      except (AttributeError, OSError):  # closed, or a reader that went away
        pass
    os._exit(2)

  watcher = threading.Thread(target=watch, name='exit after a deadline', daemon=True)
  watcher.start()
  try:
    yield
  finally:
    left.set()
    watcher.join()


def gather_from_processes(value: int) -> np.ndarray:
  """`value` of every process, by process index; with several processes a collective that every process must call."""
  if jax.process_count() == 1:
    return np.array([value])
  return np.asarray(multihost_utils.process_allgather(np.int32(value)))


def digest(data: bytes) -> int:
  """A 31-bit checksum of `data`, to compare it across processes (`gather_from_processes` takes int32s)."""
  return zlib.crc32(data) & 0x7FFFFFFF


def first_process_differing(value: int) -> int | None:
  """The first process whose `value` is not process 0's, None where all agree; a collective with several
  processes (every process must call it)."""
  values = gather_from_processes(value)
  differing = np.flatnonzero(values != values[0])
  return int(differing[0]) if differing.size else None


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  sizes = [mesh_cfg[a] for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f'{_named(sizes)} do not divide the {num_devices} devices; '
                        'choose sizes whose product divides the device count')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f'{_named(sizes)} use {math.prod(sizes)} devices but there are {num_devices}; '
                      'make their product equal the device count (or set one to -1)')
  return tuple(sizes)


def check_devices_per_process(devices) -> None:
  """Refuses processes with unequal device counts (the collectives between processes need equal ones). Every
  process sees every device with its process: all of them stop here, none waits for another."""
  counts = collections.Counter(getattr(device, 'process_index', 0) for device in devices)
  if len(set(counts.values())) > 1:
    by_process = ', '.join(f'process {p}: {n}' for p, n in sorted(counts.items()))
    raise ConfigError(f'the processes have different numbers of devices ({by_process}); give every process the same '
                      'number (on CPU, the same mesh.cpu_devices)')


def _named(sizes) -> str:
  return ', '.join(f'mesh.{axis}={size}' for axis, size in zip(AXES, sizes))


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  check_devices_per_process(devices)
  try:
    shape = mesh_shape(mesh_cfg, len(devices))
  except ConfigError as e:
    processes = len({getattr(device, 'process_index', 0) for device in devices})
    wanted = math.prod(size for size in (mesh_cfg[axis] for axis in AXES) if size != -1)
    if devices[0].platform != 'cpu' or wanted % processes:
      raise
    per_process = wanted // processes  # on CPU the device count is a setting: name it
    gives = 'gives each process' if processes > 1 else 'splits the host into'
    forced = forced_cpu_device_count()
    unless = '' if forced is None else f' once XLA_FLAGS drop --xla_force_host_platform_device_count={forced}'
    raise ConfigError(f'{e}; on CPU, mesh.cpu_devices={per_process} {gives} {per_process} devices{unless}') from None
  return Mesh(np.asarray(devices).reshape(shape), AXES, axis_types=(AxisType.Auto,) * len(AXES))


def logical_spec(names, shape, mesh: Mesh) -> P:
  """PartitionSpec for a value with logical axis `names`: each dimension on its RULES axis if that divides it."""
  if not names:
    return P()
  axes = (RULES.get(name) for name in names)
  return P(*(a if a and mesh.shape[a] > 1 and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape)))


def state_shardings(state, mesh: Mesh):
  """NamedShardings for an (abstract) nnx.State, from its variables' logical names."""

  def sharding(leaf):
    if not isinstance(leaf, nnx.Variable):
      return NamedSharding(mesh, P())
    names = leaf.get_metadata().get('out_sharding')
    return leaf.replace(NamedSharding(mesh, logical_spec(names, leaf.shape, mesh)))

  return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, batch_dim: int = 0) -> NamedSharding:
  """The batch dimension (`batch_dim`) split over data and fsdp."""
  return NamedSharding(mesh, P(*([None] * batch_dim), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> slice:
  """The contiguous rows (along `batch_dim`) of a batch-sharded array that this process's devices hold."""
  index = sharding.addressable_devices_indices_map(global_shape)
  rows = global_shape[batch_dim]
  spans = sorted({(i[batch_dim].start or 0, rows if i[batch_dim].stop is None else i[batch_dim].stop)
                  for i in index.values()})
  end = spans[0][1]
  for start, stop in spans[1:]:  # make_array_from_process_local_data takes one block of rows per process
    if start > end:
      raise ValueError(f'this process holds batch rows {spans}, not one contiguous block; build the mesh from '
                       'jax.devices() in their order (sharding.make_mesh), which keeps each process\'s rows together')
    end = max(end, stop)
  return slice(spans[0][0], end)


def put_batch(rows_fn, sharding: NamedSharding, global_shape: tuple[int, ...], batch_dim: int = 0) -> jax.Array:
  """A global batch built from this process's rows only: `rows_fn(slice) -> np.ndarray` of those rows."""
  local = rows_fn(local_rows(sharding, global_shape, batch_dim))
  return jax.make_array_from_process_local_data(sharding, local, global_shape)
