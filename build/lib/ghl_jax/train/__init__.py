"""The trainer: ``train_and_evaluate(config, workdir)`` and what it needs (``pip install ghl_jax[train]``).

    loop.py          the one loop over a method's phases: mesh, state, resume, eval, checkpoints, SIGTERM
    methods.py       each method (ghl, bp, hebbian-then-probe) as a short list of phases
    steps.py         the jitted train / Hebbian / eval steps, built on ghl_jax.value_and_grad
    validate.py      one-line config errors before anything runs
    checkpoint.py    orbax checkpoints with fall-back restore; workdir identity
    metrics.py       JSONL + TensorBoard, progress line;  plots.py: curves and receptive fields
    data/            tfds + tf.data input, offline imports;  distributed.py: multi-host start-up
"""
from ghl_jax.train.loop import NumericalError, train_and_evaluate

__all__ = ['NumericalError', 'train_and_evaluate']
