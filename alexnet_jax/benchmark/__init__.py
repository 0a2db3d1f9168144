"""`python -m alexnet_jax.benchmark`: the speed of the compute (compute.py:
the train step, checkpoints; no TensorFlow) and of the input (data.py: the
input pipeline, training end to end, prepare). The command line is in
__main__.py; docs/benchmarks.md holds the measured tables."""
