"""How the network's computations are compiled when JAX runs on the CPU.

XLA:CPU hands convolutions, dots and reductions to YNNPACK by default. On
the development machine (Intel Xeon with AVX-512 and AMX, jaxlib 0.10.2)
YNNPACK's convolutions were the slow part of the step: conv1's forward pass
at the quickstart's size took 47 ms against 2.9 ms with XLA's own
convolutions, and the paper_2012 train step at batch 64 ran at 15.9-16.9
images/sec against 22.7-23.7 (three alternated pairs). So convolutions go
to XLA's own; dots and reductions stay with YNNPACK, as by default. Setting
xla_cpu_experimental_ynn_fusion_type in XLA_FLAGS yourself overrides this.

Computations that run once, the initial parameters' random draws, compile
at XLA's backend optimization level 2 rather than 3: each parameter's
threefry and normal draw is a kernel of its own, and at level 3 LLVM took
9.5 s over them for the tests' tiny network (7.0 s at full size) against
2.3 s (2.4 s) at level 2, for the same bits (at full size they took 1.2 s
to run against 1.1).
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
