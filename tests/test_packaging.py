"""The core imports and runs a GHL step with jax, flax, optax, chex and numpy only; the trainer runs
without TensorFlow."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER_ONLY = ('tensorflow', 'tensorflow_datasets', 'orbax', 'matplotlib', 'ml_collections', 'tensorboard')

SCRIPT = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, optax, flax.linen as nn
    import ghl_jax

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), name='conv')(x))
        return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))

    model = Net()
    x = jnp.ones((2, 6, 6, 1))
    params = model.init(jax.random.key(0), x)['params']
    rule = ghl_jax.Rule('softmax_oja', t_inv=0.5)
    tx = optax.chain(ghl_jax.ghl(rule=rule), optax.sgd(0.1))
    loss = lambda p: jnp.sum(model.apply({'params': p}, x) ** 2)
    value, grads, hebb = jax.jit(ghl_jax.value_and_grad(loss, rule))(params)
    updates, _ = tx.update(grads, tx.init(params), params, hebb=hebb)
    params = optax.apply_updates(params, updates)
    assert list(hebb) == ['conv/kernel'], hebb
    print(sorted({m.split('.')[0] for m in sys.modules} | {m for m in sys.modules if m.startswith('ghl_jax')}))
''')


def test_core_step_imports_no_trainer_dependency():
  result = subprocess.run([sys.executable, '-c', SCRIPT], capture_output=True, text=True, check=True)
  imported = set(eval(result.stdout.strip().splitlines()[-1]))   # pylint: disable=eval-used
  assert 'ghl_jax' in imported and 'flax' in imported
  assert not imported & set(TRAINER_ONLY), sorted(imported & set(TRAINER_ONLY))
  assert 'ghl_jax.train' not in imported


TRAINER_SCRIPT = textwrap.dedent('''
    import sys
    from conftest import store_tiny_tfds
    from test_train import tiny_config
    from ghl_jax import train
    data_dir, name = store_tiny_tfds(sys.argv[1], 'tiny_rgb', (32, 32, 3))
    metrics = train.train_and_evaluate(tiny_config(data_dir, name, num_train_steps=2, eval_every_steps=2),
                                       sys.argv[2])
    assert 'eval/top1' in metrics, metrics
    print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))
''')


def test_the_trainer_runs_without_importing_tensorflow(tmp_path):
  """Writing a dataset, reading it through grain, training, evaluating, checkpointing and writing
  TensorBoard events import no TensorFlow module, even where TensorFlow is installed."""
  env = {'PYTHONPATH': os.pathsep.join([REPO, os.path.join(REPO, 'tests')]), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', TRAINER_SCRIPT, str(tmp_path / 'data'), str(tmp_path / 'run')],
                          capture_output=True, text=True, env=dict(os.environ, **env), cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == '[]', result.stdout[-2000:]
  assert os.listdir(tmp_path / 'run' / 'tensorboard')
