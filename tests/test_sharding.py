"""Data, FSDP and tensor-parallel meshes give the one-device result; parameters are really sharded."""

import re
import socket
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nanodecoder import config as config_lib
from nanodecoder import data as data_lib
from nanodecoder import sharding as sharding_lib
from nanodecoder import train as train_lib
from nanodecoder.config import ConfigError
from conftest import REPO
from test_train import build, params, put

# 8 heads of 4 (32 wide, feed-forward 128): every mesh axis below divides what it shards.
SHAPE = {'model.num_heads': 8, 'model.head_size': 4}


def run_steps(config, devices, steps=3):
  trainer, dataset = build(config, devices)
  losses = []
  for step in range(steps):
    trainer.state, out = trainer.train_step(trainer.state, put(trainer, dataset.train_batch(config.seed, step, 8)))
    losses.append(float(out['loss']))
  return trainer, losses


@pytest.fixture(scope='module')
def reference(corpus_file):
  from conftest import make_tiny_config
  return run_steps(make_tiny_config(corpus_file, **SHAPE), jax.devices()[:1])


@pytest.mark.parametrize('data, fsdp, tensor', [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8)])
def test_mesh_matches_one_device_and_shards_parameters(tiny_config, reference, data, fsdp, tensor):
  config = tiny_config(**SHAPE, **{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor})
  trainer, losses = run_steps(config, jax.devices()[:8])
  one, one_losses = reference
  # Tolerance: sharded matmuls and all-reduces add in another order than one device (fp32 rounding only).
  np.testing.assert_allclose(losses, one_losses, rtol=2e-6)
  for a, b in zip(jax.tree.leaves(params(trainer)), jax.tree.leaves(params(one))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6)

  block = trainer.state[0]['blocks'][0]
  fc, qkv, out = block['mlp']['fc'][...], block['attn']['qkv'][...], block['attn']['out'][...]
  expect = lambda *axes: P(*[a if a and trainer.mesh.shape[a] > 1 else None for a in axes])
  assert fc.sharding.spec == expect('fsdp', 'tensor')  # [embed, mlp]
  assert qkv.sharding.spec == expect('fsdp', None, 'tensor', None)  # [embed, 3, heads, head]
  assert out.sharding.spec == expect('tensor', None, 'fsdp')  # [heads, head, embed]
  per_device = fc.addressable_shards[0].data.shape
  assert per_device == (32 // fsdp, 128 // tensor)
  # Optimizer moments are laid out like their parameters.
  mu = trainer.state[1]['opt_state'][1][0]['mu']['blocks'][0]['mlp']['fc'][...]
  assert mu.sharding.spec == fc.sharding.spec
  # The batch, as the training loop builds it, is split into rows over data x fsdp (replicated over tensor).
  batch = train_lib.train_batches(data_lib.load_dataset(config), trainer.mesh, config.seed, 8, 0)
  assert {s.data.shape for s in batch.addressable_shards} == {(8 // (data * fsdp), batch.shape[1])}
  assert len({str(s.index) for s in batch.addressable_shards}) == data * fsdp


@pytest.mark.parametrize('data, fsdp, tensor', [(1, 8, 1), (2, 2, 2)])
def test_step_keeps_activations_in_the_batch_layout(tiny_config, data, fsdp, tensor):
  # Left to GSPMD, an FSDP step moved the residual stream between the batch's layout and the
  # parameters' embedding-axis layout with all-to-alls (102 per GPT-2-small step on 8 H100s, by
  # bench/gpu_hlo.py). The trainer pins the stream to the batch layout (Decoder activation_sharding).
  config = tiny_config(**SHAPE, **{'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.tensor': tensor})
  trainer, dataset = build(config, jax.devices()[:8])
  batch = put(trainer, dataset.train_batch(config.seed, 0, 8))
  hlo = trainer.train_step.lower(trainer.state, batch).compile().as_text()
  assert re.search(r' all-gather(-start)?\(', hlo)  # FSDP gathers parameters: the pattern matches collectives
  assert not re.search(r' all-to-all(-start)?\(', hlo)


def test_logical_spec_shards_ruled_dimensions_the_mesh_divides_and_replicates_the_rest():
  mesh = sharding_lib.make_mesh(config_lib.load_config_file(REPO / 'experiments' / 'cpu.py').mesh, jax.devices()[:8])
  spec = sharding_lib.logical_spec(('vocab', 'embed'), (65, 12), mesh)
  assert spec == P(None, None)  # 'embed' maps to fsdp, size 1 here; nothing to shard
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(1, 4, 2), sharding_lib.AXES)
  assert sharding_lib.logical_spec(('embed', 'mlp'), (12, 6), mesh) == P('fsdp', 'tensor')
  assert sharding_lib.logical_spec(('embed', 'mlp'), (10, 6), mesh) == P(None, 'tensor')  # 10 % 4 != 0
  # No rule for the vocabulary, the head size or stacked layers: replicated even where a mesh axis would divide.
  assert sharding_lib.logical_spec(('vocab', 'embed'), (64, 12), mesh) == P(None, 'fsdp')
  assert sharding_lib.logical_spec(('layers', 'heads', 'head', 'embed'), (4, 2, 8, 12), mesh) == P(
      None, 'tensor', None, 'fsdp')


@pytest.mark.parametrize('sizes, message', [
    ({'data': 3}, r'mesh.data=3, mesh.fsdp=1, mesh.tensor=1 use 3 devices but there are 8'),
    ({'data': -1, 'fsdp': 3}, r'do not divide the 8 devices'),
])
def test_mesh_sizes_must_match_the_devices(tiny_config, sizes, message):
  config = tiny_config(**{f'mesh.{k}': v for k, v in sizes.items()})
  with pytest.raises(ConfigError, match=message):
    sharding_lib.make_mesh(config.mesh, jax.devices()[:8])


@pytest.mark.parametrize('sizes, devices', [({'data': 4}, 2), ({'tensor': 2}, 1)])
def test_a_cpu_mesh_of_more_devices_names_the_setting_that_makes_them(tiny_config, sizes, devices, monkeypatch):
  monkeypatch.delenv('XLA_FLAGS')  # (the tests' own: it would be named too)
  config = tiny_config(**{f'mesh.{k}': v for k, v in sizes.items()})
  wanted = max(sizes.values())
  with pytest.raises(ConfigError, match=rf'\b{devices}\b.*; on CPU, mesh.cpu_devices={wanted} splits the host '
                                        rf'into {wanted} devices$'):
    sharding_lib.make_mesh(config.mesh, jax.devices()[:devices])


def test_processes_with_unequal_device_counts_are_refused(tiny_config):
  """Every process sees every device with its process: each stops with this line (the collectives between
  processes would fail with a traceback)."""
  devices = [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate((0, 0, 1))]
  with pytest.raises(ConfigError, match=r'different numbers of devices \(process 0: 2, process 1: 1\); give every '
                     r'process the same number \(on CPU, the same mesh.cpu_devices\)'):
    sharding_lib.make_mesh(tiny_config().mesh, devices)


@pytest.mark.parametrize('data, message', [
    (8, r'use 8 devices but there are 4; .*; on CPU, mesh.cpu_devices=4 gives each process 4 devices$'),
    # 3 devices do not split over 2 processes: no setting to name
    (3, r'use 3 devices but there are 4; make their product equal the device count \(or set one to -1\)$'),
])
def test_a_cpu_mesh_over_several_processes_names_the_devices_each_needs(tiny_config, monkeypatch, data, message):
  monkeypatch.delenv('XLA_FLAGS')  # (the tests' own: it would be named too)
  devices = [types.SimpleNamespace(id=i, process_index=p, platform='cpu') for i, p in enumerate((0, 0, 1, 1))]
  with pytest.raises(ConfigError, match=message):  # (equal counts per process: no complaint about them)
    sharding_lib.make_mesh(tiny_config(**{'mesh.data': data}).mesh, devices)


@pytest.mark.parametrize('env, detected', [
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2', 'SLURM_STEP_NODELIST': 'node[1-2]'}, True),  # srun's tasks
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '2'}, False),  # the batch script itself, outside srun
    ({'SLURM_JOB_ID': '7', 'SLURM_NTASKS': '1', 'SLURM_STEP_NODELIST': 'node1'}, False),
    ({'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_MCA_orte_hnp_uri': '123.0;tcp://10.0.0.1:4000'}, True),  # Open MPI 4
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '1'}, False),  # one process under any Open MPI
    ({}, False),
])
def test_cluster_launchers_are_detected(monkeypatch, env, detected):
  for name in (*CLUSTER_VARIABLES, 'OMPI_MCA_orte_hnp_uri'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert sharding_lib._cluster_detected() == detected


CLUSTER_VARIABLES = ('SLURM_JOB_ID', 'SLURM_NTASKS', 'SLURM_STEP_NODELIST', 'OMPI_COMM_WORLD_SIZE',
                     'TPU_WORKER_HOSTNAMES')


def test_open_mpi_5_which_jax_does_not_detect_asks_for_the_coordinator(monkeypatch):
  monkeypatch.delenv('OMPI_MCA_orte_hnp_uri', raising=False)
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  with pytest.raises(ConfigError, match=r'^Open MPI 5 started this program, which JAX does not detect; run one '
                                        r'process per node with --coordinator_address=HOST0:PORT'):
    sharding_lib.initialize_distributed('auto')


def test_what_jax_distributed_cannot_fill_in_is_one_line(monkeypatch):
  def initialize(**kwargs):
    raise ValueError('Number of processes must be defined.')

  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', initialize)
  with pytest.raises(ConfigError, match=r'^jax.distributed.initialize: Number of processes must be defined; pass '
                                        r'--coordinator_address, --num_processes and --process_id'):
    sharding_lib.initialize_distributed('on')


def test_distributed_off_with_the_flags_to_join_others_is_refused(monkeypatch):
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: pytest.fail('joined'))
  with pytest.raises(ConfigError, match=r'^--distributed=off runs this process alone, but --coordinator_address, '
                                        r'--num_processes or --process_id asks to join others; remove them'):
    sharding_lib.initialize_distributed('off', num_processes=2, process_id=1)
  assert sharding_lib.initialize_distributed('off') is False


def test_joining_says_what_it_waits_for_and_gives_jax_a_later_deadline(monkeypatch, capsys):
  """JAX's own deadline aborts the process (a C++ stack trace): it must come after the one error line's."""
  calls = []
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
  assert sharding_lib.initialize_distributed('auto', '10.0.0.1:1234', 2, 1, timeout=7) is True
  assert calls[0]['initialization_timeout'] == 7 + sharding_lib.JAX_DEADLINE_MARGIN_S > 7
  assert capsys.readouterr().err == ('joining 2 processes through 10.0.0.1:1234 as process 1 (waiting up to 7 s; '
                                     '--distributed_timeout)\n')
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  sharding_lib.initialize_distributed('on')  # what JAX finds in SLURM's, Open MPI's or a TPU slice's settings
  assert capsys.readouterr().err == ("joining the other processes through the coordinator that JAX finds in the "
                                     "cluster's settings (waiting up to 300 s; --distributed_timeout)\n")


@pytest.mark.parametrize('address', ['10.0.0.1', ':1234', '10.0.0.1:port', '10.0.0.1:0', '10.0.0.1:65536',
                                     '10.0.0.1:70000'])
def test_a_coordinator_address_that_is_not_host_and_port_is_refused(monkeypatch, address):
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: pytest.fail('joined'))
  with pytest.raises(ConfigError, match=rf"^--coordinator_address={address} is not HOST:PORT; give process 0's "):
    sharding_lib.initialize_distributed('auto', address, 2, 1)


def test_a_coordinator_port_in_use_on_process_0_is_refused_before_jax_listens_on_it(monkeypatch):
  """JAX raises a JaxRuntimeError ('Failed to start RPC server'), or sometimes crashes (a segmentation fault)."""
  monkeypatch.delenv('JAX_COORDINATOR_BIND_ADDRESS', raising=False)
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: pytest.fail('joined'))
  with socket.create_server(('127.0.0.1', 0)) as other_program:
    address = f'127.0.0.1:{other_program.getsockname()[1]}'
    with pytest.raises(ConfigError, match=rf'^port \d+ of --coordinator_address={address} is in use on this host, '
                                          r'where process 0 serves it: another program \(an earlier run\?\) holds it'):
      sharding_lib.initialize_distributed('auto', address, 2, 0)
    calls = []
    monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: calls.append(kwargs))
    assert sharding_lib.initialize_distributed('auto', address, 2, 1) and calls  # process 1 does not listen


def test_a_coordinator_that_cannot_start_is_one_line(monkeypatch):
  def initialize(**kwargs):
    raise jax.errors.JaxRuntimeError('UNKNOWN: Failed to start RPC server')

  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', initialize)
  with pytest.raises(ConfigError, match=r'^cannot join through 127.0.0.1:1234: UNKNOWN: Failed to start RPC server; '
                                        r'check that no other program \(an earlier run\?\) uses its port'):
    sharding_lib.initialize_distributed('auto', '127.0.0.1:1234', 2, 1)


@pytest.mark.parametrize('timeout', [0, -5])
def test_a_distributed_timeout_that_is_not_positive_is_refused(monkeypatch, timeout):
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: pytest.fail('joined'))
  with pytest.raises(ConfigError, match=rf'^--distributed_timeout={timeout} must be positive: the seconds to wait '
                                        r'for every process to join$'):
    sharding_lib.initialize_distributed('on', '10.0.0.1:1234', 2, 0, timeout=timeout)


@pytest.mark.parametrize('num_processes, process_id, message', [
    (2, 2, r'^--process_id=2 must be a number >= 0 below --num_processes=2 \(0 to 1\): this process\'s place in '),
    (None, -1, r'^--process_id=-1 must be a number >= 0: '),
    (0, 0, r'^--num_processes=0 must be at least 1: the processes of the job, all hosts$'),
])
def test_process_numbers_out_of_range_are_refused_before_joining(monkeypatch, capsys, num_processes, process_id,
                                                                 message):
  monkeypatch.setattr(sharding_lib.jax.distributed, 'initialize', lambda **kwargs: pytest.fail('joined'))
  with pytest.raises(ConfigError, match=message):
    sharding_lib.initialize_distributed('auto', '10.0.0.1:1234', num_processes, process_id)
  assert capsys.readouterr().err == ''  # no 'joining ...' line before the error


def test_xla_flags_set_the_cpu_device_count_and_refuse_another_asked_for(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2 --xla_force_host_platform_device_count=4')
  assert sharding_lib.forced_cpu_device_count() == 4  # the last one wins, as in XLA
  sharding_lib.set_cpu_devices(6)  # the flags win: nothing to do
  sharding_lib.set_cpu_devices(6, asked=0)  # mesh.cpu_devices=0: none asked for
  sharding_lib.set_cpu_devices(6, asked=4)
  with pytest.raises(ConfigError, match=r'^mesh.cpu_devices=2 asks for another CPU device count than XLA_FLAGS, whose '
                                        r'--xla_force_host_platform_device_count=4 wins; drop one of the two$'):
    sharding_lib.set_cpu_devices(6, asked=2)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_enable_fast_math=false')
  assert sharding_lib.forced_cpu_device_count() is None


def test_processes_compare_int32_digests_and_name_the_first_that_differs(monkeypatch):
  assert 0 <= sharding_lib.digest(b'a') < 2**31  # (its CRC-32 is 0xe8b7be43: above the int32 range)
  assert sharding_lib.digest(b'a') != sharding_lib.digest(b'b')
  assert sharding_lib.first_process_differing(5) is None  # one process
  monkeypatch.setattr(sharding_lib, 'gather_from_processes', lambda value: np.array([value, value, value]))
  assert sharding_lib.first_process_differing(5) is None
  monkeypatch.setattr(sharding_lib, 'gather_from_processes', lambda value: np.array([value, value, 7, 8]))
  assert sharding_lib.first_process_differing(5) == 2


def test_one_cpu_device_per_core_the_process_may_use(monkeypatch):
  monkeypatch.setattr(sharding_lib.os, 'sched_getaffinity', lambda pid: {0, 5, 6}, raising=False)  # e.g. taskset
  assert sharding_lib.usable_cores() == 3


@pytest.mark.parametrize('overrides', [
    {'model.scan_layers': True},
    {'model.remat': 'block'},
    {'model.remat': 'matmuls', 'model.scan_layers': True},
])
def test_scan_and_remat_compute_the_same_step(tiny_config, reference, overrides):
  config = tiny_config(**SHAPE, **overrides)
  trainer, losses = run_steps(config, jax.devices()[:1])
  one, one_losses = reference
  # The program really scans and recomputes: the same numbers alone would not show it.
  model = trainer.model()
  gradient = str(jax.make_jaxpr(nnx.grad(lambda m: m(jnp.zeros((1, 8), jnp.int32))[0].sum()))(model))
  assert (' scan[' in gradient) == bool(overrides.get('model.scan_layers'))
  assert (' remat2[' in gradient) == (overrides.get('model.remat', 'none') != 'none')  # jax.checkpoint
  np.testing.assert_allclose(losses, one_losses, rtol=1e-5)  # same math, fp32 rounding in another order
  flat = lambda t: jax.tree.leaves(jax.tree.map(np.asarray, t))
  ours = nnx.state(trainer.model(), nnx.Param)
  if overrides.get('model.scan_layers'):  # stacked [L, ...] blocks: compare layer by layer
    ours = [nnx.state(b, nnx.Param) for b in trainer.model().layers()]
    theirs = [nnx.state(b, nnx.Param) for b in one.model().layers()]
    for a, b in zip(ours, theirs):
      for x, y in zip(flat(a), flat(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
  else:
    for x, y in zip(flat(ours), flat(params(one))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)


def test_bfloat16_compute_keeps_fp32_parameters_and_follows_fp32(tiny_config):
  trainer, losses = run_steps(tiny_config(**SHAPE, **{'model.dtype': 'bfloat16'}), jax.devices()[:2], steps=20)
  _, fp32_losses = run_steps(tiny_config(**SHAPE), jax.devices()[:2], steps=20)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params(trainer)))
  assert trainer.model_config.dtype == 'bfloat16' and not np.array_equal(losses, fp32_losses)  # bf16 ran
  np.testing.assert_allclose(losses, fp32_losses, atol=0.03)  # bf16 rounding of activations only
  assert losses[-1] < losses[0] - 0.2


@pytest.mark.parametrize('cores, mesh, expected', [
    (8, {}, 6),  # the CPU recipe's batch of 12 splits 6 ways, not 8
    (16, {}, 12),
    (10, {}, 6),
    (2, {}, 2),
    (8, {'fsdp': 2}, 6),  # data 3 x fsdp 2
    (9, {'fsdp': 2}, 6),  # odd cores: counts of whole fsdp groups only (not 7 = 3 x 2 + 1)
    (8, {'data': 1, 'tensor': -1}, 4),  # 4 heads
    (16, {'tensor': 4}, 16),  # data 4 x tensor 4
    (8, {'cpu_devices': 3}, 3),  # asked for
    (3, {'data': 2}, 2),  # no -1 axis: the devices the mesh names
    (2, {'data': 4}, 2),  # more than the cores: training refuses the mesh in one line
    (8, {'data': 0}, 8),  # a config that does not validate: every core (training refuses it in one line)
])
def test_automatic_cpu_device_count_splits_the_batch_and_mesh(cores, mesh, expected):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.mesh.update(mesh)
  assert sharding_lib.cpu_device_count(config, cores) == expected


class _Rows:
  """A stand-in sharding whose addressable devices hold the given row ranges of a [8, 4] batch."""

  def __init__(self, *spans):
    self.spans = spans

  def addressable_devices_indices_map(self, shape):
    return {device: (slice(start, stop), slice(None)) for device, (start, stop) in enumerate(self.spans)}


def test_local_rows_are_one_block_or_a_clear_error():
  assert sharding_lib.local_rows(_Rows((4, 6), (6, 8), (4, 6)), (8, 4)) == slice(4, 8)  # repeats: replicas
  assert sharding_lib.local_rows(_Rows((None, None)), (8, 4)) == slice(0, 8)
  with pytest.raises(ValueError, match=re.escape('holds batch rows [(0, 2), (4, 6)], not one contiguous block')):
    sharding_lib.local_rows(_Rows((0, 2), (4, 6)), (8, 4))
