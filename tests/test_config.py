"""Experiment files load, and bad fields are refused with one clear line."""

import dataclasses
import types

import ml_collections
import pytest

from nanodecoder import config as config_lib
from nanodecoder.config import ConfigError
from nanodecoder.metrics import flatten_config
from nanodecoder.model import ModelConfig
from conftest import REPO


@pytest.mark.parametrize('name', ['base', 'cpu'])
def test_experiments_load_and_validate(name):
  config = config_lib.load_config_file(REPO / 'experiments' / f'{name}.py')
  config_lib.validate(config)
  assert config.name == name


@pytest.mark.parametrize('spec', ['base.py', 'cpu.py', 'gpt2_small.py', 'sweep.py:blocks', 'sweep.py:shape,base'])
def test_every_experiment_has_exactly_the_fields_the_code_reads(spec):
  config = config_lib.load_config_file(f'{REPO / "experiments" / spec}')
  assert set(flatten_config(config)) == config_lib.FIELDS
  model_fields = {f'model.{f.name}' for f in dataclasses.fields(ModelConfig) if f.name != 'vocab_size'}
  assert model_fields <= config_lib.FIELDS


def test_misspelt_and_missing_fields_are_refused_by_name():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.train.learning_rat = 0.5  # a typo in an experiment file would otherwise train the default silently
  with pytest.raises(ConfigError, match=r'^unknown config field train.learning_rat \(did you mean '
                                        r'train.learning_rate\?\); fix its name or remove it'):
    config_lib.validate(config)
  del config.train['learning_rat'], config.model['scan_layers'], config.mesh['tensor']
  with pytest.raises(ConfigError, match=r'^the config has no field mesh.tensor \(and 1 more\); every config needs'):
    config_lib.validate(config)


def test_a_saved_config_without_a_field_is_refused_when_read(tmp_path):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  del config.model['scan_layers']  # e.g. edited by hand
  (tmp_path / config_lib.SAVED_CONFIG).write_text(config.to_json())
  with pytest.raises(ConfigError, match='the config has no field model.scan_layers;'):
    config_lib.read_saved_config(tmp_path)


def test_a_run_saved_before_a_field_existed_reads_with_the_value_that_does_what_it_did(tmp_path):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  del config.data['vocab_size']  # (added with BPE merges: runs before trained on characters)
  (tmp_path / config_lib.SAVED_CONFIG).write_text(config.to_json())
  assert config_lib.read_saved_config(tmp_path).data.vocab_size == 0
  assert set(config_lib.ADDED_FIELDS) <= config_lib.FIELDS


def test_recipes_match_nanogpt():
  base = config_lib.load_config_file(REPO / 'experiments' / 'base.py')
  cpu = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  shape = lambda c: (c.model.num_layers, c.model.num_heads, c.model.num_heads * c.model.head_size, c.model.context_length)
  assert shape(base) == (6, 6, 384, 256) and shape(cpu) == (4, 4, 128, 64)
  assert (base.train.batch_size, base.train.num_steps, base.model.dropout) == (64, 5000, 0.2)
  assert (cpu.train.batch_size, cpu.train.num_steps, cpu.train.decay_steps, cpu.model.dropout) == (12, 2000, 2000, 0.0)
  for c in (base, cpu):
    assert (c.train.learning_rate, c.train.min_learning_rate, c.train.warmup_steps, c.train.beta2) == (1e-3, 1e-4, 100, 0.99)
    assert c.data.eval_split == 'validation+test'


@pytest.mark.parametrize('field, value, message', [
    ('model.num_layers', 0, r'model.num_layers must be a positive integer, got 0'),
    ('model.head_size', -4, r'model.head_size must be a positive integer, got -4'),
    ('train.batch_size', 0, r'train.batch_size must be a positive integer'),
    ('model.dropout', 1.0, r'model.dropout must be in \[0, 1\)'),
    ('model.dtype', 'float64', r"model.dtype must be one of 'float32', 'bfloat16', 'float16', got 'float64'"),
    ('data.source', 'web', r"data.source must be one of 'tfds', 'text'"),
    ('train.warmup_steps', 3000, r'train.warmup_steps=3000 must be below train.decay_steps=2000'),
    # Equal, the cosine's progress would be (step - warmup) / 0: a NaN learning rate at step warmup_steps.
    ('train.decay_steps', 100, r'train.warmup_steps=100 must be below train.decay_steps=100'),
    ('train.min_learning_rate', 2e-3, r'train.min_learning_rate must be in \[0, train.learning_rate=0.001\], '
     r'got 0.002'),
    ('train.min_learning_rate', -1e-4, r'train.min_learning_rate must be in \[0, .*got -0.0001'),
    ('train.beta2', 1.0, r'train.beta2 must be in \[0, 1\), got 1.0'),
    ('train.grad_clip', -1.0, r'train.weight_decay and train.grad_clip must be >= 0'),
    ('data.text_eval_fraction', 0.0, r'data.text_eval_fraction must be in \(0, 1\), got 0.0'),
    ('data.text_eval_fraction', 1.0, r'data.text_eval_fraction must be in \(0, 1\), got 1.0'),
    ('mesh.fsdp', -1, r'only one of mesh.data, mesh.fsdp, mesh.tensor may be -1'),  # mesh.data is -1
    ('mesh.fsdp', 3, r'mesh.fsdp=3 does not divide the embedding width 128'),
    ('train.steps_per_call', 3, r'train.num_steps=2000 is not a multiple of train.steps_per_call=3'),
    ('train.log_every', 105, r'^train.log_every=105 is not a multiple of train.steps_per_call=10; make it one'),
    ('eval.every', 255, r'^eval.every=255 is not a multiple of train.steps_per_call=10; make it one'),
    ('checkpoint.every', 15, r'^checkpoint.every=15 is not a multiple of train.steps_per_call=10; make it one'),
    ('name', '..', r"^name must be a plain folder name \(the default workdir is runs/<name>\), got '..'$"),
    ('name', 'a/b', r"^name must be a plain folder name .*, got 'a/b'$"),
    ('train.learning_rate', 0.0, r'train.learning_rate must be > 0'),
    ('mesh.data', 0, r'mesh.data must be a positive integer or -1'),
    ('seed', -1, r'seed must be an integer >= 0, got -1'),
    ('seed', 2**32, r'seed must be below 2\*\*32 .*, got 4294967296'),
    ('train.learning_rate', float('nan'), r'train.learning_rate must be a finite number, got nan'),
    ('train.weight_decay', float('inf'), r'train.weight_decay must be a finite number, got inf'),
    ('train.learning_rate', 1e39, r'train.learning_rate must be a finite float32 number \(at most 3.4e38 in size\), '
     r'got 1e\+39'),
    ('train.grad_accum_steps', 5, r'train.batch_size=12 is not divisible by train.grad_accum_steps=5'),
    ('mesh.tensor', 3, r'mesh.tensor=3 does not divide model.num_heads=4'),
    ('mesh.data', 5, r'train.batch_size=12 \(micro-batch 12\) is not divisible by the data-parallel size 5'),
    # fsdp splits the batch too
    ('mesh.fsdp', 8, r'train.batch_size=12 \(micro-batch 12\) is not divisible by the data-parallel size 8'),
])
def test_validate_names_field_and_value(field, value, message):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config_lib.validate(config)  # the recipe passes: the one change below is what is refused
  config_lib.set_field(config, field, value)
  with pytest.raises(ConfigError, match=message) as error:
    config_lib.validate(config)
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('overrides', [
    {'train.min_learning_rate': 1e-3},  # = learning_rate: a constant rate after warmup
    {'train.warmup_steps': 2000, 'train.decay_steps': 3000},  # warmup as long as the run (num_steps 2000)
    {'train.beta1': 0.0, 'train.beta2': 0.0},  # no momentum
    {'train.weight_decay': 0.0, 'train.grad_clip': 0.0},  # 0 turns them off
    {'train.profile_steps': 10, 'train.profile_start': 1990},  # the trace ends at the last step
])
def test_settings_on_the_boundary_of_what_is_taken_validate(overrides):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.train.update({field.split('.')[1]: value for field, value in overrides.items()})
  config_lib.validate(config)


def test_a_profile_that_starts_at_the_last_step_is_refused():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.train.update(profile_steps=10, profile_start=2000)  # num_steps 2000: the trace would start at step 2001
  with pytest.raises(ConfigError, match=r'^train.profile_start=2000 is not below train.num_steps=2000: the trace of '
                                        r'train.profile_steps would never start'):
    config_lib.validate(config)


def test_the_micro_batch_not_the_batch_must_split_over_the_data_parallel_devices():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.train.grad_accum_steps = 2
  config.mesh.data = 4  # divides the batch of 12 but not its micro-batches of 6
  with pytest.raises(ConfigError, match=r'^train.batch_size=12 \(micro-batch 6\) is not divisible by the '
                                        r'data-parallel size 4 \(mesh data x fsdp\); pick a multiple of 8$'):
    config_lib.validate(config)


CUDNN_BF16 = {'model.attention_impl': 'cudnn', 'model.dtype': 'bfloat16'}


@pytest.mark.parametrize('overrides, message', [
    ({'model.attention_impl': 'cudnn'}, r"model.attention_impl='cudnn' needs model.dtype='bfloat16' or 'float16', "
                                        r"got 'float32'"),
    ({**CUDNN_BF16, 'model.head_size': 12}, r"attention_impl='cudnn' needs model.head_size a multiple of 8 .*got 12"),
    ({**CUDNN_BF16, 'model.head_size': 264}, r'got 264; use attention_impl=.auto. or change head_size'),
    ({**CUDNN_BF16, 'model.dropout': 0.1}, r"'cudnn' has no attention-weight dropout but model.dropout=0.1"),
    ({'model.attention_impl': 'xla', 'model.dropout': 0.2}, r"model.attention_impl='xla' has no attention-weight"),
])
def test_fused_attention_settings_that_cannot_run_are_refused(overrides, message):
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  for field, value in overrides.items():
    config_lib.set_field(config, field, value)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config)


def test_cudnn_with_a_head_size_above_128_runs_from_hopper_on_only():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.model.update(attention_impl='cudnn', dtype='bfloat16', head_size=256)
  config_lib.validate(config)  # (the GPUs are not known yet)
  assert config_lib.attention_cannot_run(config.model, 'gpu', '8.0') == (
      "model.attention_impl='cudnn' takes model.head_size up to 128 on these GPUs (compute capability 8.0; 256 from "
      "Hopper, 9.0, on), got 256; use 'auto' or a smaller head_size")
  assert config_lib.attention_cannot_run(config.model, 'gpu', '9.0') is None
  # Evaluating or sampling a run trained so: 'auto' where its 'cudnn' cannot run
  device = lambda platform, capability=None: types.SimpleNamespace(platform=platform, compute_capability=capability)
  for here, impl in ((device('gpu', '9.0'), 'cudnn'), (device('gpu', '8.0'), 'auto'), (device('cpu'), 'auto')):
    assert config_lib.for_reading_here(config, 2, here).model.attention_impl == impl
  config.model.head_size = 128
  assert config_lib.attention_cannot_run(config.model, 'gpu', '8.0') is None


def test_xla_attention_in_float16_cannot_run_on_cpu_devices_only():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.model.update(attention_impl='xla', dtype='float16')
  assert config_lib.attention_cannot_run(config.model, 'cpu') == (
      "model.attention_impl='xla' with model.dtype='float16' does not run on cpu devices (no float16 matmul with "
      "float32 sums there); use 'auto' or 'einsum', or bfloat16")
  assert config_lib.attention_cannot_run(config.model, 'gpu', '8.0') is None
  config.model.dtype = 'bfloat16'
  assert config_lib.attention_cannot_run(config.model, 'cpu') is None


def test_cudnn_in_bfloat16_validates_without_a_gpu():  # a sweep validates its points on the launching host
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.model.update(attention_impl='cudnn', dtype='bfloat16')  # head_size 32, dropout 0
  config_lib.validate(config)


@pytest.mark.parametrize('field, value, message', [
    ('train.warmup_steps', None, r'train.warmup_steps must be an integer >= 0, got None'),
    ('train.warmup_steps', 10.5, r'train.warmup_steps must be an integer >= 0, got 10.5'),
    ('mesh.cpu_devices', '2', r"mesh.cpu_devices must be an integer >= 0, got '2'"),
    ('data.vocab_size', -512, r'data.vocab_size must be an integer >= 0, got -512'),
    ('model.num_layers', True, r'model.num_layers must be a positive integer, got True'),  # (a bool is an int)
    ('mesh.data', 2.0, r'mesh.data must be a positive integer or -1 \(all devices left over\), got 2.0'),
    ('model.use_bias', 'false', r"model.use_bias must be true or false, got 'false'"),
    ('checkpoint.async_save', None, r'checkpoint.async_save must be true or false, got None'),
])
def test_fields_of_the_wrong_type_are_refused_by_name(field, value, message):
  """As a hand-edited config.json (no ml_collections types) or a None in an experiment file can hold them."""
  settings = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py').to_dict()
  section, leaf = field.split('.')
  settings[section][leaf] = value
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(ml_collections.ConfigDict(settings))


def test_warmup_longer_than_run():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.train.num_steps = 50
  with pytest.raises(ConfigError, match=r'warmup_steps=100 is longer than the run \(train.num_steps=50\)'):
    config_lib.validate(config)


def test_set_field_refuses_unknown_fields_and_wrong_types():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  with pytest.raises(ConfigError, match=r"unknown config field 'model.num_layer'"):
    config_lib.set_field(config, 'model.num_layer', 3)
  with pytest.raises(ConfigError, match=r"unknown config field 'modle'"):
    config_lib.set_field(config, 'modle.num_layers', 3)
  with pytest.raises(ConfigError, match=r"config field 'model.num_layers' cannot take 'four'"):
    config_lib.set_field(config, 'model.num_layers', 'four')
  with pytest.raises(ConfigError) as error:  # ml_collections says why over two lines: the error stays one
    config_lib.set_field(config, 'model.num_layers', {'a': 1})
  assert '\n' not in str(error.value) and "cannot take {'a': 1}: Could not override field" in str(error.value)
  with pytest.raises(ConfigError, match=r"^config field 'train' is a section; set its fields, e.g. train\.\w+$"):
    config_lib.set_field(config, 'train', {'batch_size': 4})  # would have replaced the whole section


def test_text_source_needs_a_path():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.data.source = 'text'
  with pytest.raises(ConfigError, match=r'needs data.text_path'):
    config_lib.validate(config)


def test_a_text_path_beside_the_tfds_source_is_refused_not_ignored():
  config = config_lib.load_config_file(REPO / 'experiments' / 'cpu.py')
  config.data.text_path = 'my_corpus.txt'  # data.source left at 'tfds': the run would train on tiny-shakespeare
  with pytest.raises(ConfigError, match=r"^data.text_path='my_corpus.txt' is not read with data.source='tfds' .*"
                                        r"--config.data.source=text"):
    config_lib.validate(config)


def test_missing_config_file():
  with pytest.raises(ConfigError, match=r"config file 'experiments/nope.py' does not exist"):
    config_lib.load_config_file('experiments/nope.py')
