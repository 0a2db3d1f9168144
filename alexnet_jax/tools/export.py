"""--mode=export: a checkpoint as a TensorFlow SavedModel, for serving without JAX.

The network is converted with jax2tf; its parameters become TF variables.
The serving signature takes what evaluation feeds the network, uint8 images
of image_size x image_size (the centre crop of the shorter side resized to
resize_size), and returns the softmax, with the training mean subtracted
inside. class_names.txt beside it gives the classes in output order.
"""

import os

import jax
from jax.experimental import jax2tf
import numpy as np
import tensorflow as tf

from alexnet_jax.tools import inference


def run(config, workdir: str, checkpoint: str, export_dir: str = '',
        allow_config_change: bool = False) -> str:
  """Write the SavedModel (default: WORKDIR/saved_model); return its path."""
  params, step, names = inference.load(
      'export', config, workdir, checkpoint, allow_config_change)
  export_dir = export_dir or os.path.join(workdir, 'saved_model')
  size = config.image_size

  module = tf.Module()
  module.params = tf.nest.map_structure(
      tf.Variable, jax.tree.map(np.asarray, params))
  probabilities = jax2tf.convert(
      inference.probabilities_fn(config), polymorphic_shapes=[None, '(b, ...)'],
      with_gradient=False)

  @tf.function(autograph=False, input_signature=[
      tf.TensorSpec([None, size, size, 3], tf.uint8, name='images')])
  def serve(images):
    return {'probabilities': probabilities(module.params, images)}

  module.serve = serve
  tf.saved_model.save(module, export_dir, signatures={'serving_default': serve})
  with open(os.path.join(export_dir, 'class_names.txt'), 'w') as f:
    f.write('\n'.join(names) + '\n')
  print(f'step {step} exported to {export_dir}', flush=True)
  return export_dir
