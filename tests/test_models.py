"""Model zoo: parameter counts from architecture arithmetic, numpy references of the special
pieces (Triangle, reflect padding, adaptive pooling, option-A shortcut, attention), and one
jitted GHL train step per model family."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ghl_jax
from ghl_jax import models
from ghl_jax.models import layers as layers_lib
from ghl_jax.models import resnet as resnet_lib
from ghl_jax.models import softhebb as softhebb_lib
from ghl_jax.models import vit as vit_lib

REGISTERED = {'deephebb', 'deephebb_softhebb', 'fasthebb', 'vgg16', 'vgg16_bn', 'resnet18', 'resnet50',
              'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet1202',
              'vit_tiny', 'vit_b16'}


def rng(seed):
  """RBG keys: XLA:CPU compiles their random bits far faster than threefry's (init dominates)."""
  return jax.random.key(seed, impl='rbg')


def flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def param_count(model, size):
  shapes = jax.eval_shape(lambda: model.init(rng(0), jnp.zeros((1, size, size, 3)), train=False))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes['params']))


# ---- architecture arithmetic (weights + biases, BN scale + shift) --------------------------------

def conv_count(c_in, c_out, k, bias=False):
  return k * k * c_in * c_out + (c_out if bias else 0)


def linear_count(n_in, n_out):
  return n_in * n_out + n_out


def deephebb_count(classes=10):
  convs = conv_count(3, 96, 5) + conv_count(96, 384, 3) + conv_count(384, 1536, 3)
  return convs + linear_count(1536 * 4 * 4, classes)


def fasthebb_count(classes=10):
  convs = conv_count(3, 96, 5) + conv_count(96, 128, 3) + conv_count(128, 192, 3) + conv_count(192, 256, 3)
  return convs + linear_count(3 * 3 * 256, 4096) + 2 * 4096 + linear_count(4096, classes)


def cifar_resnet_count(depth, classes=10):
  n = (depth - 2) // 6
  total = conv_count(3, 16, 3) + 2 * 16
  c_in = 16
  for planes in (16, 32, 64):
    for _ in range(n):
      total += conv_count(c_in, planes, 3) + conv_count(planes, planes, 3) + 4 * planes
      c_in = planes
  return total + linear_count(64, classes)


def vit_count(patch, tokens, hidden, depth, mlp, classes):
  layer_norms = 2 * 2 * hidden
  attention = 4 * linear_count(hidden, hidden)
  per_block = layer_norms + attention + linear_count(hidden, mlp) + linear_count(mlp, hidden)
  embed = conv_count(3, hidden, patch, bias=True) + hidden + (tokens + 1) * hidden
  return embed + depth * per_block + 2 * hidden + linear_count(hidden, classes)


def test_registry_has_every_model_and_rejects_unknown_names():
  assert set(models.names()) == REGISTERED
  with pytest.raises(ValueError, match='known models: .*resnet1202'):
    models.build('resnet19')
  with pytest.raises(ValueError, match='6n\\+2'):
    models.CifarResNet(depth=21).init(rng(0), jnp.zeros((1, 8, 8, 3)), train=False)


@pytest.mark.parametrize('name, size, millions', [
    ('resnet20', 32, '0.27'),     # He et al. 2016, Table 6
    ('resnet56', 32, '0.85'),
    ('resnet110', 32, '1.7'),
    ('resnet1202', 32, '19.4'),
    ('resnet18', 224, '11.69'),   # torchvision
    ('resnet50', 224, '25.56'),
    ('vgg16', 224, '138.36'),
    ('vit_b16', 224, '86.6'),     # Dosovitskiy et al. 2021
])
def test_published_parameter_counts(name, size, millions):
  """The count rounds to the published figure (to its last digit)."""
  decimals = len(millions.split('.')[1])
  assert round(param_count(models.build(name), size) / 1e6, decimals) == float(millions)


@pytest.mark.parametrize('name, size, expected', [
    ('deephebb', 32, deephebb_count()),
    ('deephebb_softhebb', 32, deephebb_count()),
    ('fasthebb', 32, fasthebb_count()),
    *[(f'resnet{d}', 32, cifar_resnet_count(d)) for d in (20, 32, 44, 56, 110, 1202)],
    ('resnet18', 224, 11_689_512),     # torchvision
    ('resnet50', 224, 25_557_032),
    ('vgg16', 224, 138_357_544),
    ('vgg16_bn', 224, 138_365_992),
    ('vit_b16', 224, vit_count(16, 196, 768, 12, 3072, 1000)),
    ('vit_tiny', 32, vit_count(4, 64, 192, 12, 768, 10)),
])
def test_exact_parameter_counts(name, size, expected):
  assert param_count(models.build(name), size) == expected


# ---- numpy references of the special pieces ------------------------------------------------------

def test_triangle_matches_numpy_and_has_finite_gradients():
  u = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32)
  for power in (0.7, 1.4, 1.0):
    centred = u - u.mean(-1, keepdims=True)
    expected = np.maximum(centred, 0) ** power
    np.testing.assert_allclose(softhebb_lib.triangle(jnp.asarray(u), power), expected, rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda v: softhebb_lib.triangle(v, power).sum())(jnp.asarray(u))
    assert np.all(np.isfinite(grad))


def numpy_conv(x, kernel):
  """VALID cross-correlation, NHWC input, HWIO kernel."""
  kh, kw = kernel.shape[:2]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      out += x[:, i:i + oh, j:j + ow, :] @ kernel[i, j]
  return out


def test_softhebb_convs_reflect_pad_and_use_large_radius_init():
  model = models.build('deephebb_softhebb', width=1 / 16)
  images = jax.random.normal(rng(1), (2, 8, 8, 3))
  init_and_tap = lambda v: (v, ghl_jax.tap(model.apply)(v, images, train=False)[1])
  variables, taps = jax.jit(lambda: init_and_tap(model.init(rng(0), images, train=False)))()
  for name, k in (('conv1', 5), ('conv2', 3)):
    x, u = np.asarray(taps[name]['inputs'], np.float64), taps[name]['outputs']
    padded = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)), mode='reflect')
    kernel = np.asarray(variables['params'][name]['kernel'], np.float64)
    np.testing.assert_allclose(u, numpy_conv(padded, kernel), rtol=1e-4, atol=1e-3)
  kernel = softhebb_lib.large_radius_normal(rng(0), (5, 5, 3, 96))
  assert np.std(kernel) == pytest.approx(25 / np.sqrt(75), rel=0.05)
  weights = softhebb_lib.uniform_classifier(rng(0), (24576, 10))
  assert 0 <= np.min(weights) and np.max(weights) < 0.1105
  assert np.mean(weights) == pytest.approx(0.1105 / 2, rel=0.02)


@pytest.mark.parametrize('size_in', [1, 5, 9, 14])
def test_adaptive_avg_pool_matches_torch_bins(size_in):
  x = np.random.default_rng(size_in).normal(size=(2, size_in, size_in + 1, 3))
  expected = np.zeros((2, 7, 7, 3))
  for i in range(7):
    for j in range(7):
      r0, r1 = int(np.floor(i * size_in / 7)), int(np.ceil((i + 1) * size_in / 7))
      c0, c1 = int(np.floor(j * (size_in + 1) / 7)), int(np.ceil((j + 1) * (size_in + 1) / 7))
      expected[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
  np.testing.assert_allclose(layers_lib.adaptive_avg_pool(jnp.asarray(x, jnp.float32), (7, 7)), expected,
                             rtol=1e-5, atol=1e-6)


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
  block = resnet_lib.BasicBlock(planes=8, strides=2, shortcut='A', train=True)
  x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype(np.float32)

  @jax.jit
  def init_zero_kernels_and_apply(x):
    variables = block.init(rng(0), x)
    is_kernel = lambda path: 'kernel' in jax.tree_util.keystr(path)
    zeroed = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.zeros_like(leaf) if is_kernel(path) else leaf, variables)
    return variables['params'], block.apply(zeroed, x, mutable=['batch_stats'])[0]

  params, out = init_zero_kernels_and_apply(x)   # the branch is 0: out = relu(shortcut(x))
  assert not any('shortcut' in path for path in flat(params))
  expected = np.maximum(np.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2))), 0)
  np.testing.assert_allclose(out, expected, atol=1e-6)


def test_attention_matches_numpy_multi_head_attention():
  attention = vit_lib.SelfAttention(heads=2)
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  params = attention.init(rng(0), x)['params']
  proj = {n: (np.asarray(params[n]['kernel'], np.float64), np.asarray(params[n]['bias'], np.float64))
          for n in ('query', 'key', 'value', 'out')}
  q, k, v = (x @ proj[n][0] + proj[n][1] for n in ('query', 'key', 'value'))
  heads = []
  for h in range(2):
    part = slice(4 * h, 4 * h + 4)
    logits = q[..., part] @ k[..., part].transpose(0, 2, 1) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    heads.append((weights / weights.sum(-1, keepdims=True)) @ v[..., part])
  expected = np.concatenate(heads, -1) @ proj['out'][0] + proj['out'][1]
  np.testing.assert_allclose(attention.apply({'params': params}, x), expected, rtol=1e-4, atol=1e-5)


def test_zero_init_residual_zeroes_the_last_bn_of_every_block():
  x = jnp.zeros((1, 4, 4, 8))
  for block, last in ((resnet_lib.BasicBlock, 'bn2'), (resnet_lib.Bottleneck, 'bn3')):
    params = flat(jax.jit(block(planes=2, strides=2, zero_init_residual=True).init)(rng(0), x)['params'])
    scales = {p: params[p] for p in params if p.endswith('scale')}
    assert set(scales) == {f'bn{i}/scale' for i in range(1, int(last[-1]) + 1)} | {'shortcut_bn/scale'}
    for path, scale in scales.items():
      assert np.all(scale == (0 if path == f'{last}/scale' else 1)), path


def test_compute_dtype_keeps_float32_params_and_logits():
  model = models.build('resnet20', dtype=jnp.bfloat16)

  def init_and_apply(images):
    variables = model.init(rng(0), images, train=False)
    return variables['params'], model.apply(variables, images, train=False)

  params, logits = jax.eval_shape(init_and_apply, jnp.ones((2, 32, 32, 3)))
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  assert logits.dtype == jnp.float32


# ---- one GHL train step per family ---------------------------------------------------------------

LR = 0.1


def ghl_step(model, size, layers=None, batch=4):
  """Init, then one jitted step of ``chain(ghl(rule=Rule(layers=layers)), sgd(LR))`` on random data."""
  images = jax.random.normal(rng(1), (batch, size, size, 3))
  labels = jnp.arange(batch) % 10
  variables = model.init(rng(0), images, train=False)
  params, state = variables['params'], {k: v for k, v in variables.items() if k != 'params'}
  tx = optax.chain(ghl_jax.ghl(rule=ghl_jax.Rule(layers=layers)), optax.sgd(LR))

  def loss_fn(p):
    (logits, _), taps = ghl_jax.tap(model.apply)(
        {'params': p, **state}, images, train=True, mutable=['batch_stats'], rngs={'dropout': rng(2)})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), taps

  @jax.jit
  def step(p, opt_state):
    (_, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, _ = tx.update(grads, opt_state, p, taps=taps)
    h_hat = {path: h.normalized() for path, h in ghl_jax.hebbian_terms(p, taps, layers=layers).items()}
    return optax.apply_updates(p, updates), grads, h_hat, taps

  return (params, *step(params, tx.init(params)))


def check_ghl_update(params, new_params, grads, h_hat, selected):
  """Selected kernels moved by ``-LR·sign(g)·|Ĥ|``, every other leaf by ``-LR·g``."""
  params, new_params, grads = flat(params), flat(new_params), flat(grads)
  assert set(h_hat) == selected
  moved = 0
  for path, p in params.items():
    p, g = np.asarray(p, np.float64), np.asarray(grads[path], np.float64)
    if path in selected:
      h = np.asarray(h_hat[path], np.float64)
      assert h.shape == p.shape and np.max(np.abs(h)) == pytest.approx(1.0)
      expected = p - LR * np.sign(g) * np.abs(h)
      moved += np.count_nonzero(np.sign(g) * h)
    else:
      expected = p - LR * g
    np.testing.assert_allclose(new_params[path], expected, rtol=1e-5, atol=1e-7, err_msg=path)
  assert moved > 0


def conv_kernels(params):
  """Kernels of rank >= 4: conv kernels (HWIO), stacked or not (stacked Dense kernels have rank 3)."""
  return {p for p, leaf in flat(params).items() if p.endswith('kernel') and leaf.ndim >= 4}


def check_taps(params, taps, expected):
  """``taps`` has an entry per expected kernel, stacked like the kernel under nn.scan."""
  chosen = ghl_jax.selected_layers(taps, None if expected is None else '|'.join(expected))
  expected = conv_kernels(params) if expected is None else set(expected)
  assert set(chosen) == expected
  kernels = flat(params)
  for path, entry in chosen.items():
    stacked = kernels[path].ndim - entry['layer'].kernel_ndim
    assert entry['inputs'].shape[:stacked] == kernels[path].shape[:stacked]
    assert entry['outputs'].shape[-1] == kernels[path].shape[-1]


FAMILIES = {
    'deephebb': (dict(width=1 / 16), 16),
    'deephebb_softhebb': (dict(width=1 / 16), 16),
    'fasthebb': (dict(width=1 / 16), 32),
    'vgg16_bn': (dict(width=1 / 16, num_classes=10), 32),
    'resnet18': (dict(width=1 / 16, num_classes=10, small_input=True, stage_sizes=(1, 1, 1, 1)), 16),
    'resnet50': (dict(width=1 / 16, num_classes=10, stage_sizes=(1, 1, 1, 1)), 32),
    'resnet20': (dict(width=0.25), 16),
}


@pytest.mark.parametrize('name', sorted(FAMILIES))
def test_ghl_step_on_every_conv_kernel(name):
  kwargs, size = FAMILIES[name]
  params, new_params, grads, h_hat, taps = ghl_step(models.build(name, **kwargs), size)
  check_taps(params, taps, None)
  check_ghl_update(params, new_params, grads, h_hat, conv_kernels(params))


def test_cifar_resnet_scans_identical_blocks_with_option_b_and_remat():
  model = models.CifarResNet(depth=14, shortcut='B', remat=True, width=0.25)
  params, new_params, grads, h_hat, taps = ghl_step(model, 16)
  kernels = flat(params)
  assert kernels['stage2_blocks/conv1/kernel'].shape == (1, 3, 3, 8, 8)
  assert {'stage2_block0/shortcut_conv/kernel', 'stage3_block0/shortcut_conv/kernel'} <= set(kernels)
  assert taps['stage3_blocks']['conv2']['inputs'].shape == (1, 4, 4, 4, 16)
  check_taps(params, taps, None)
  check_ghl_update(params, new_params, grads, h_hat, conv_kernels(params))


def test_resnet50_strides_on_the_3x3_conv():
  model = models.ResNet50(stage_sizes=(1, 1), width=1 / 16, small_input=True)
  images = jnp.zeros((1, 8, 8, 3))
  _, taps = ghl_jax.tap(model.apply)(model.init(rng(0), images, train=False), images, train=False)
  block = taps['stage2_block0']
  assert block['conv1']['outputs'].shape[1:3] == (8, 8)
  assert block['conv2']['outputs'].shape[1:3] == (4, 4)


def test_vit_ghl_step_on_scanned_dense_layers():
  model = models.ViT(num_classes=10, patch_size=4, hidden_dim=16, depth=2, heads=2, mlp_dim=32,
                     dropout_rate=0.1)
  params, new_params, grads, h_hat, taps = ghl_step(model, 16, layers='encoder/')
  check_taps(params, taps, None)
  assert conv_kernels(params) == {'patch_conv/kernel'}
  dense = {f'encoder/{m}/kernel' for m in ('attention/query', 'attention/key', 'attention/value',
                                          'attention/out', 'mlp_in', 'mlp_out')}
  check_taps(params, taps, dense)
  assert taps['encoder']['attention']['query']['inputs'].shape == (2, 4, 17, 16)
  check_ghl_update(params, new_params, grads, h_hat, dense)
