"""The kurtosis of the linear layers' inputs (research/eval/input_kurtosis.py): the estimator on
hand-checked vectors, the probes seeing each site's input, and the model left as it was."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from equivalence import copy_parameters
from research import config as config_lib
from research import run_config
from research.eval.input_kurtosis import input_kurtosis, token_kurtosis
from research.model.lm import DecoderLM
from research.model.linear import Linear


def model(**overrides):
  c = run_config.default_config()
  c.model.vocab_size = 61
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 64, 4
  config_lib.apply_overrides(c, overrides)
  return DecoderLM(run_config.resolve(c).model, rngs=nnx.Rngs(0))


def test_token_kurtosis_by_hand():
  # one non-zero feature among n: (n^2 - 3n + 3) / (n - 1); +-1 alternating: 1 (the minimum)
  n = 4
  x = jnp.asarray([[1.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
  np.testing.assert_allclose(token_kurtosis(x[:1]), (n * n - 3 * n + 3) / (n - 1), rtol=1e-6)
  np.testing.assert_allclose(token_kurtosis(x[1:]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(token_kurtosis(x), (7 / 3 + 1) / 2, rtol=1e-6)  # mean over tokens
  # a token whose features are all equal has no kurtosis: left out of the mean, NaN alone
  constant = jnp.full((1, 4), 2.0)
  np.testing.assert_allclose(token_kurtosis(jnp.concatenate([x, constant])), (7 / 3 + 1) / 2,
                             rtol=1e-6)
  assert np.isnan(token_kurtosis(constant))
  # scale and shift do not change it; Gaussian features give about 3
  g = jax.random.normal(jax.random.key(0), (64, 4096))
  np.testing.assert_allclose(token_kurtosis(5 * g + 2), token_kurtosis(g), rtol=1e-4)
  assert abs(float(token_kurtosis(g)) - 3.0) < 0.05


@pytest.mark.parametrize("kind", ["plain", "qat"])
def test_one_value_per_block_and_site(kind):
  m = model(**{"model.linear.kind": kind})
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  got = input_kurtosis(m, tokens)
  assert list(got) == ["qkv", "o", "fc1", "fc2"]  # a QAT linear's inner `proj` is not a site
  assert all(len(v) == 2 and all(x >= 1.0 for x in v) for v in got.values())


def test_probes_see_the_input_and_leave_the_model_as_it_was():
  m = model()
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  before = m(tokens)
  types = [type(x).__name__ for _, x in nnx.iter_graph(m) if isinstance(x, Linear)]
  plain = input_kurtosis(m, tokens)
  np.testing.assert_array_equal(m(tokens), before)
  assert [type(x).__name__ for _, x in nnx.iter_graph(m) if isinstance(x, Linear)] == types
  # one outlier feature in block 0's attention input (its norm's gain): the qkv site of block 0
  # reads nearly one non-zero feature among 64, (64^2 - 3 64 + 3) / 63 = 62.0; block 1 does not
  scale = m.blocks[0].attn_norm.norm.scale
  scale[...] = scale[...].at[5].set(1e4)
  outlier = input_kurtosis(m, tokens)
  assert plain["qkv"][0] < 10
  np.testing.assert_allclose(outlier["qkv"][0], 62.0, rtol=0.02)
  assert outlier["qkv"][1] < 0.5 * outlier["qkv"][0]


@pytest.mark.parametrize("overrides", [{"model.scan_blocks": "on"}, {"model.remat": "block"}])
def test_scanned_and_rematerialized_blocks_give_the_unrolled_values(overrides):
  """The probes record inside a scan's and jax.checkpoint's trace: the same parameters give
  the same values per block as the plain unrolled forward."""
  plain = model()
  other = copy_parameters(plain, model(**overrides))
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 61)
  want, got = input_kurtosis(plain, tokens), input_kurtosis(other, tokens)
  assert list(got) == list(want)
  for site in want:
    np.testing.assert_allclose(got[site], want[site], rtol=1e-5)


def test_sites_are_named_by_their_place_in_the_block():
  """A mixer's own `gate` is not the FFN's (fc1): linears outside the four sites keep their
  path in the block; an MTP head's block is not one of the decoder's blocks."""
  got = input_kurtosis(model(**{"model.attention.kind": "deltaproduct",
                                "model.attention.deltaproduct.gate": True}),
                       jax.random.randint(jax.random.key(1), (2, 16), 0, 61))
  assert {"qkv", "o", "fc1", "fc2", "attn.gate"} <= set(got)
  assert all(len(v) == 2 for v in got.values())
  mtp = input_kurtosis(model(**{"model.head.kind": "mtp"}),
                       jax.random.randint(jax.random.key(1), (2, 16), 0, 61))
  assert all(len(v) == 2 for v in mtp.values())
