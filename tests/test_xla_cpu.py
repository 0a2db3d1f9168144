"""On the CPU the network's convolutions compile to XLA's own, not YNNPACK's."""

import re

from alexnet_jax.benchmark import compute
from alexnet_jax.model import parallel
from alexnet_jax.runtime import xla_cpu
from alexnet_jax.train import steps


def _computations(hlo: str) -> dict[str, str]:
  """Each computation of an HLO module's text, by name."""
  return {m.group(1): m.group(0) for m in re.finditer(
      r'^%?([\w.-]+) .*?\{\n.*?^\}', hlo, re.MULTILINE | re.DOTALL)}


def test_the_train_step_s_convolutions_are_not_ynnpack_fusions(tiny_config):
  assert xla_cpu.compiler_options() is not None  # CPU, and jaxlib has it
  mesh = parallel.make_mesh(tiny_config)
  state = steps.create_sharded_train_state(tiny_config, mesh)
  hlo = steps.make_train_step(tiny_config, mesh, steps_per_epoch=10).lower(
      state, compute.random_batch(tiny_config, mesh)).compile().as_text()
  computations = _computations(hlo)
  ynn = [computations[name] for name in re.findall(
      r'kind=kCustom, calls=%?([\w.-]+).*__ynn_fusion', hlo)]
  assert ynn, 'dots and reductions are still YNNPACK fusions'
  assert 'convolution(' in hlo
  assert not [c for c in ynn if 'convolution(' in c]
