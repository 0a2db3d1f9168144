"""How the network's computations are compiled when JAX runs on the CPU.

XLA:CPU hands convolutions, dots and reductions to YNNPACK by default.
For AlexNet's shapes XLA's own convolutions are much faster than YNNPACK's,
so convolutions go to XLA's own; dots and reductions stay with YNNPACK, as
by default (`benchmark --what=train_step` shows it; docs/benchmarks.md).
Setting xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS yourself
overrides this.

Computations that run once, the initial parameters' random draws, compile
at XLA's backend optimization level 2 rather than 3: each parameter's
threefry and normal draw is a kernel of its own, which LLVM takes several
times as long to compile at level 3, for the same bits and no faster run
(the start-up row of docs/benchmarks.md).
"""

import functools
import os
from typing import Any, Callable, Optional

import jax
import numpy as np

_OPTION = 'xla_cpu_experimental_ynn_fusion_type'
_OPTIONS = {_OPTION: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,'
                     'LIBRARY_FUSION_TYPE_REDUCE'}


@functools.cache
def compiler_options() -> Optional[dict[str, str]]:
  """The options above on CPU, if this XLA has them and XLA_FLAGS does not
  set them; otherwise None (XLA's defaults)."""
  if (jax.default_backend() != 'cpu'
      or _OPTION in os.environ.get('XLA_FLAGS', '')):
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=_OPTIONS).lower(
        np.float32(0)).compile()
  except jax.errors.JaxRuntimeError:  # an XLA without this option
    return None
  return _OPTIONS


def jit(fun: Callable[..., Any], runs_once: bool = False,
        **kwargs) -> Callable[..., Any]:
  """jax.jit with compiler_options(); runs_once: at level 2 (see above)."""
  options = compiler_options()
  if runs_once and jax.default_backend() == 'cpu':
    options = {**(options or {}), 'xla_backend_optimization_level': 2}
  return jax.jit(fun, compiler_options=options, **kwargs)
