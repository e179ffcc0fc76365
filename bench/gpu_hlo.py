"""A training step's optimized XLA program for NVIDIA H100s, compiled on a machine without a GPU.

  python bench/gpu_hlo.py                                   # GPT-2-small shape, its experiment's settings
  python bench/gpu_hlo.py --shape base --set 'model.dtype="bfloat16"'
  python bench/gpu_hlo.py --devices 8 --set mesh.fsdp=8 --set mesh.data=1   # FSDP over 8 GPUs of one host

XLA compiles ahead of time for a described target (deviceless compilation):
no GPU or driver is needed, only JAX's CUDA plugin and libraries, installed
apart from the project (about 5 GB, so preferably in a virtual environment
that sees the project's packages):

  python -m venv --system-site-packages /tmp/cuda && \\
    /tmp/cuda/bin/pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"
  /tmp/cuda/bin/python bench/gpu_hlo.py

Prints the kernels of the step by kind (matmuls, fused attention, collectives
between devices, transposes, reductions, elementwise loops) and the bytes they
read and write (a model of memory traffic, whole arrays per kernel), and writes the
optimized HLO and a JSON summary (default bench/out/gpu_hlo.*). Use it to see what a change does to the GPU
program, e.g. whether layouts force transposes, before a GPU is at hand; only
a GPU can time it (bench/gpu_check.sh). Autotuning needs a device, so XLA
takes its default matmul configurations: the matmuls show as gemm fusions
rather than cuBLAS calls, the rest of the program is what a GPU compiles.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import pathlib
import re
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cli_args import checked_configs, out_file, override, positive_int, shape  # noqa: E402
from nanodecoder.files import atomic_write  # noqa: E402  (light: no JAX import)

# XLA's description of the target: one H100 SXM 80GB (132 SMs, 50 MB L2, 3.35 TB/s, compute capability 9.0).
H100_TARGET = '''
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  core_count: 132
  fpus_per_core: 128
  threads_per_warp: 32
  threads_per_block_limit: 1024
  threads_per_core_limit: 2048
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  l2_cache_size: 52428800
  memory_bandwidth: 3352320000000
  device_memory_size: 84929347584
  clock_rate_ghz: 1.98
}
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 8 }
'''

KINDS = (  # (kind, pattern on a kernel's name, then on its call target / backend), first match wins
    ('matmul', r'^gemm_fusion|^__cublas'),
    ('attention', r'^__cudnn\$fmha'),
    ('collective', r'^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)$'),
    ('transpose', r'transpose'),
    ('reduction', r'reduce'),
    ('triton', r'^__triton$'),  # fused by XLA into Triton kernels (LayerNorm, softmax)
    ('elementwise', r'^loop_'),
)


def kernel_counts(hlo: str) -> dict[str, int]:
  """Kernels of the optimized program by kind: its fusions and library calls, wherever they sit."""
  kernels = re.findall(r'^\s+%([\w.-]+) = \S.*? fusion\(.*?(?:"kind":"(\w+)"|$)', hlo, re.M)
  kernels += [(target, '') for target in re.findall(r'custom-call\(.*custom_call_target="([^"]+)"', hlo)]
  collectives = r'^\s+%[\w.-]+ = \S.*? (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
  kernels += [(op, '') for op in re.findall(collectives, hlo, re.M)]
  counts = collections.Counter()
  for name, backend in kernels:
    counts[next((kind for kind, pattern in KINDS if re.search(pattern, name) or re.search(pattern, backend)),
                'other')] += 1
  return {kind: counts[kind] for kind, _ in KINDS + (('other', ''),)}


_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'f64': 8}


_ARRAY = re.compile(r'\b(pred|[su]8|bf16|f16|[suf]32|[sf]64)\[([\d,]*)\]')


def _bytes(shape: str, element: str = '') -> int:
  """Bytes of an HLO shape (an array, or a tuple of them: element '#i' takes its i-th): 'bf16[32,768]{1,0}' -> 49152."""
  arrays = _ARRAY.findall(shape)
  if element:
    arrays = arrays[int(element[1:]):][:1]
  return sum(_BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d) for dtype, dims in arrays)


def kernel_traffic(hlo: str) -> dict[str, float]:
  """GB the kernels read and write per step, counting each kernel's whole inputs and outputs (a slice counts
  the array it slices; a cuBLAS call its workspace): matmuls, bound by compute, and everything else."""
  shapes = dict(re.findall(r'^\s+%([\w.-]+) = (\(.*?\)|\S+) ', hlo, re.M))
  traffic = {'matmul_gb': 0.0, 'other_gb': 0.0}
  kernels = re.findall(r'^\s+%([\w.-]+) = (\(.*?\)|\S+) (?:fusion|custom-call)\(([^)]*)\)(.*)$', hlo, re.M)
  for name, output, operands, rest in kernels:
    size = _bytes(output) + sum(_bytes(shapes.get(operand, ''), element)
                                for operand, element in re.findall(r'%([\w.-]+)(#\d+)?', operands))
    traffic['matmul_gb' if name.startswith('gemm_fusion') or '__cublas' in rest else 'other_gb'] += size / 1e9
  return traffic


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shape', type=shape, default='gpt2_small', help='experiment file under experiments/')
  parser.add_argument('--devices', type=positive_int, default=1, help='GPUs of one host the mesh spans')
  parser.add_argument('--set', action='append', default=[], metavar='FIELD=JSON', type=override,
                      help='config override')
  parser.add_argument('--out', type=out_file, default=str(REPO / 'bench' / 'out' / 'gpu_hlo'),
                      help='output path without suffix')
  args = parser.parse_args()
  os.environ.setdefault('JAX_SKIP_CUDA_CONSTRAINTS_CHECK', '1')  # its check needs a driver
  os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_autotune_level=0'
  # A bad field stops the script here, not after the CUDA plugin check (or a compilation) of minutes
  config, = checked_configs(parser, [REPO / 'experiments' / f'{args.shape}.py'], args.set)

  import jax
  import jax.numpy as jnp
  from jax.experimental import topologies

  from nanodecoder import config as config_lib, sharding, train
  from nanodecoder.model import auto_attention_impl

  try:
    topology = topologies.get_topology_desc(platform='cuda', topology=f'1x1x{args.devices}',
                                           target_config=H100_TARGET)
  except Exception as e:  # noqa: BLE001  (any failure means the same thing here)
    reason = (str(e).splitlines() or [''])[0]
    sys.exit(f'cannot compile for CUDA here ({type(e).__name__}: {reason}); install '
             f'"jax-cuda12-plugin[with-cuda]=={jax.__version__}" (see the top of {pathlib.Path(__file__).name})')
  m = config.model
  if m.attention_impl == 'auto':  # 'auto' would look at this machine's backend, the CPU
    m.attention_impl = auto_attention_impl(jnp.dtype(m.dtype), m.head_size, 'gpu') if m.dropout == 0 else 'einsum'
  config_lib.validate(config)
  mesh = sharding.make_mesh(config.mesh, devices=topology.devices)
  trainer = train.create_trainer(config, config_lib.model_config(config, 65), mesh, init=False)
  rows, context = config.train.batch_size, config.model.context_length
  batch = jax.ShapeDtypeStruct((rows, context + 1), jnp.int32, sharding=sharding.batch_sharding(mesh))
  hlo = trainer.train_step.lower(trainer.abstract_state, batch).compile().as_text()

  counts, traffic = kernel_counts(hlo), kernel_traffic(hlo)
  print(f'{args.shape} on {args.devices} x {topology.devices[0].device_kind} (deviceless), mesh '
        f'{dict(mesh.shape)}, attention_impl={config.model.attention_impl} {" ".join(args.set)}')
  print('kernels:', '  '.join(f'{kind} {n}' for kind, n in counts.items()))
  print(f'kernel inputs + outputs per step (per device): matmuls {traffic["matmul_gb"]:.1f} GB, '
        f'the rest {traffic["other_gb"]:.1f} GB')
  out = pathlib.Path(args.out)
  atomic_write(out.with_suffix('.hlo.txt'), hlo)
  summary = {'shape': args.shape, 'overrides': args.set, 'attention_impl': config.model.attention_impl,
             'jax': jax.__version__, 'target': f'{args.devices} x H100 80GB (deviceless)', 'kernels': counts,
             'traffic': traffic}
  atomic_write(out.with_suffix('.json'), json.dumps(summary, indent=2) + '\n')
  print(f'wrote {out.with_suffix(".hlo.txt")} and {out.with_suffix(".json")}')


if __name__ == '__main__':
  main()
