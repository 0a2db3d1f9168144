"""Training: the train state and the pure train and eval steps (steps.py),
the paper's SGD (optimizer.py), evaluation over a split (evaluation.py),
checkpoints, stop requests (preemption.py), metrics, and the loop that
ties them together (trainer.py). Imports runtime/, model/, config and
data/; the tools reach into the loop only through its eval_images hook."""
