"""The core imports and runs a GHL step with jax, flax, optax, chex and numpy only."""
import subprocess
import sys
import textwrap

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
