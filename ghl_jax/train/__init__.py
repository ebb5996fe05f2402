"""The trainer: ``train_and_evaluate(config, workdir)`` and what it needs (``pip install ghl_jax[train]``).

    loop.py          the one loop over a method's phases: mesh, state, resume, eval, checkpoints, SIGTERM
    methods.py       each method (ghl, bp, hebbian-then-probe) as a short list of phases
    steps.py         the jitted train / Hebbian / eval steps, built on ghl_jax.value_and_grad
    validate.py      one-line config errors before anything runs
    checkpoint.py    orbax checkpoints: fall-back restore of unreadable ones, refusal of incompatible ones
    run_config.py    the resolved config saved in the workdir; the fields a resume may change
    summary.py       parameters and FLOPs per module at the start of a run
    metrics.py       JSONL + TensorBoard, progress line;  plots.py: curves and receptive fields
    data/            tfds array_record input through grain, offline imports;  distributed.py: multi-host start-up
    events.py        TensorBoard event files without TensorFlow;  workdir.py: local folder or gs:// bucket
"""
try:
  from ghl_jax.train.loop import NumericalError, train_and_evaluate
except ModuleNotFoundError as error:         # the core alone is installed
  raise ModuleNotFoundError(f'ghl_jax.train needs {error.name!r}: pip install "ghl_jax[train]".') from None

__all__ = ['NumericalError', 'train_and_evaluate']
