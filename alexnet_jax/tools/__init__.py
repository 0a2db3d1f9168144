"""What looks at a trained network: a checkpoint's network as the tools use
it (inference.py), --mode=eval with ensembles, predict, the paper's Figures
3 and 4, and export to a TensorFlow SavedModel. May import every layer
below it."""
