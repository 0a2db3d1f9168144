"""The benchmarks run on a tiny model and report what they measured."""

import json
import statistics
import subprocess
import sys

import jax
import pytest

from alexnet_jax.benchmark import compute
from alexnet_jax.benchmark import data
from alexnet_jax.train import steps
import command_line


def test_train_step_benchmark_reports_a_rate_per_repeat(tiny_config):
  result = compute.time_train_step(tiny_config, warmup=1, repeats=2,
                                   steps_per_repeat=1)
  assert len(result['repeats']) == 2 and result['images_per_sec'] > 0
  assert isinstance(result['page_faults_per_step'], int)
  # The reported rate is the median of the repeats (of two: their mean).
  assert result['images_per_sec'] == pytest.approx(
      sum(result['repeats']) / 2, abs=0.02)


def test_checkpoint_benchmark_saves_and_restores_the_train_state(tiny_config):
  result = compute.time_checkpoint(tiny_config, repeats=2)
  assert 0 < result['save_blocking_s'] <= result['save_total_s']
  assert result['restore_s'] > 0
  # Parameters and their momentum: more than the parameters alone.
  params = jax.eval_shape(lambda: steps.create_train_state(tiny_config)).params
  assert result['megabytes'] > sum(
      x.size * x.dtype.itemsize for x in jax.tree.leaves(params)) / 1e6


def test_end_to_end_benchmark_names_the_slower_of_input_and_step(tiny_config):
  result = data.time_end_to_end(tiny_config, warmup=1, repeats=2,
                                steps_per_repeat=2)
  alone = {'input_pipeline': result['input_pipeline_images_per_sec'],
           'train_step': result['train_step_images_per_sec']}
  assert min(alone.values()) > 0 and result['images_per_sec'] > 0
  assert result['bound'] == min(alone, key=alone.get)
  assert result['fraction_of_bound'] == pytest.approx(
      result['images_per_sec'] / alone[result['bound']], abs=2e-3)


def test_input_pipeline_on_photos_times_three_sources_and_their_cores():
  """The raw store, the 256-px copy and the full-size photos in every
  repeat; the copy's fraction pairs each repeat with the decode limit
  measured right after it, since the limit alone moves a lot on a shared
  machine."""
  result = subprocess.run(
      [sys.executable, '-m', 'alexnet_jax.benchmark',
       '--config=configs/quickstart.py', '--what=input_pipeline',
       '--photos=96x80', '--photos_count=40', '--config.batch_size=8',
       '--repeats=3', '--steps=2', '--warmup=1', '--rate=1000'],
      cwd=command_line.REPO, env=command_line.environment(),
      capture_output=True, text=True, timeout=600, check=True)
  measured = json.loads(result.stdout.splitlines()[-1])
  for what in data.PHOTO_SOURCES:
    rates = measured[what]['repeats']
    assert len(rates) == 3 and min(rates) > 0
    per_core = measured[what]['images_per_sec_per_core']
    assert per_core == pytest.approx(
        statistics.median(rates) / measured['cores'], abs=0.1)
    assert measured[what]['cores_for_rate'] == pytest.approx(
        1000 / per_core, abs=0.1)
  copy = measured['jpeg_copy']
  assert len(copy['decode_limits']) == 3
  fractions = [rate / measured['cores'] / limit for rate, limit
               in zip(copy['repeats'], copy['decode_limits'])]
  assert copy['fraction_of_decode_limit'] == pytest.approx(
      statistics.median(fractions), rel=2e-3)
  assert measured['photo_pixels'] == 96 * 80
