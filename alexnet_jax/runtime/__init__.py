"""The process and its host: the one-line user error, console lines, atomic
files, Ctrl-C before training, the huge-pages restart, how XLA compiles on
the CPU, TensorFlow kept to tf.data, joining other processes, the workdir's
one-job lock and progress lines. Imports no other part of alexnet_jax."""
