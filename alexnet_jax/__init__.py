"""AlexNet (Krizhevsky, Sutskever, Hinton 2012) in JAX/Flax, two towers and all.

The package in layers, bottom to top; a module imports only from its own
layer and the layers below it (tests/test_layout.py checks this):

  runtime/    the process and its host: errors, console lines, files,
              interrupts, huge pages, XLA and TensorFlow set-up, several
              processes, the workdir lock
  model/      the network: the paper's layers, the variants, the towers on a
              device mesh and every cross-tower collective
  config.py   every config key with its default; loading and checking one
  data/       examples in: the sources, the streams, augmentation, the
              built-in dataset, ImageNet's archives, prepare and stats
  train/      the loop, the steps, the optimizer, evaluation, checkpoints,
              stop requests and metrics
  tools/      what looks at a checkpoint: its network, eval, predict,
              figures, export
  benchmark/  `python -m alexnet_jax.benchmark`
  main.py     `python -m alexnet_jax.main`
"""
