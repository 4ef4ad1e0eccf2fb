"""MoDA as a sequence mixer: its attention against the paper's equations (the kernel package's
reference), the depth stream's slots and writers term by term, the Table 3 variants' parameter
counts, gradients through depth, the Pallas path, remat and every norm placement."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_pallas.moda import moda_reference
from research import config as config_lib
from research.model import (ForwardContext, abstract_model, attention, count_params,
                            create_model, moda)

from test_model import small_config, tokens

forward = nnx.jit(lambda model, x: model(x))


def moda_config(**overrides):
  return small_config(**{"attention.kind": "moda", "num_kv_heads": 2, **overrides})


def positions(b, t):
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def rand(key, shape):
  return jax.random.normal(jax.random.key(key), shape, jnp.float32)


# ------------------------------------------------------------------ the attention op

def test_moda_xla_equals_reference_and_dense_without_depth():
  b, t, h, kv, d, s = 2, 7, 4, 2, 8, 3
  q, k, v = rand(0, (b, t, h, d)), rand(1, (b, t, kv, d)), rand(2, (b, t, kv, d))
  dk, dv = rand(3, (b, t, s, kv, d)), rand(4, (b, t, s, kv, d))
  pos = positions(b, t)
  got = moda.moda_xla(q, k, v, dk, dv, q_positions=pos, k_positions=pos)
  np.testing.assert_allclose(got, moda_reference(q, k, v, dk, dv), rtol=1e-5, atol=1e-5)
  slot_major = moda.moda_xla(q, k, v, jnp.moveaxis(dk, 2, 0), jnp.moveaxis(dv, 2, 0),
                             q_positions=pos, k_positions=pos, slot_axis=0)  # the model's buffers
  np.testing.assert_allclose(slot_major, got, rtol=1e-6, atol=1e-6)
  plain = moda.moda_xla(q, k, v, None, None, q_positions=pos, k_positions=pos)
  np.testing.assert_allclose(plain, attention.xla_attention(q, k, v, q_positions=pos,
                                                            k_positions=pos), rtol=1e-5, atol=1e-6)


def test_depth_slots_are_written_in_order_and_read_only_once_written():
  ctx = ForwardContext(positions=positions(1, 2))
  cfg = None
  k = rand(0, (1, 2, 1, 4))
  moda.write_depth(ctx, cfg, 0, k, k)
  moda.write_depth(ctx, cfg, 1, 2 * k, 2 * k)
  dk, _ = moda.read_depth(ctx, 2)  # the kernels' layout [b, t, S, kv, d]
  np.testing.assert_array_equal(dk[:, :, 1], 2 * k)
  with pytest.raises(ValueError, match="out of order"):
    moda.write_depth(ctx, cfg, 3, k, k)
  with pytest.raises(ValueError, match=r"slots \[2\] were not written"):
    moda.read_depth(ctx, 3)


def test_a_tokens_depth_slots_reach_only_that_token():
  """Depth attention is same-position: changing token 3's depth K/V changes only row 3."""
  b, t, h, kv, d, s = 1, 6, 2, 1, 8, 2
  q, k, v = rand(0, (b, t, h, d)), rand(1, (b, t, kv, d)), rand(2, (b, t, kv, d))
  dk, dv = rand(3, (b, t, s, kv, d)), rand(4, (b, t, s, kv, d))
  pos = positions(b, t)
  base = moda.moda_xla(q, k, v, dk, dv, q_positions=pos, k_positions=pos)
  moved = moda.moda_xla(q, k, v, dk.at[:, 3].add(1.0), dv.at[:, 3].add(1.0), q_positions=pos,
                        k_positions=pos)
  changed = np.abs(np.asarray(moved - base)).max(axis=(0, 2, 3)) > 1e-6
  assert changed.tolist() == [i == 3 for i in range(t)]


# ------------------------------------------------------------------ the depth stream

@pytest.mark.parametrize("ffn_kv,expected", [(True, [0, 2, 4, 6]), (False, [0, 1, 2, 3])])
def test_each_block_sees_the_slots_of_the_blocks_before(ffn_kv, expected):
  """Default MoDA: block b sees S = 2b slots (attention + FFN K/V of each earlier block);
  depth K/V only (Table 3 row 3): S = b."""
  cfg = moda_config(num_layers=4, **{"attention.moda.ffn_kv": ffn_kv})
  model = create_model(cfg)
  assert [blk.attn.depth_slots for blk in model.blocks] == expected
  writers = [blk.channel_side is not None for blk in model.blocks]
  assert writers == ([True, True, True, False] if ffn_kv else [False] * 4)


def test_one_block_moda_is_dense_attention():
  """Block 0 has no depth slots: a one-block MoDA model is the dense model, parameter for
  parameter (the last block's FFN K/V projection is omitted). Both run the jnp attention, so
  the outputs are bit-identical."""
  dense = create_model(small_config(num_layers=1, num_kv_heads=2, **{"attention.impl": "xla"}))
  md = create_model(moda_config(num_layers=1))
  x = tokens()
  np.testing.assert_array_equal(forward(md, x), forward(dense, x))


def test_two_block_forward_by_hand():
  """The decoder's output equals a hand assembly of Fig. 1 (pre-norm): block 1's attention
  sees [attention K/V of block 0; FFN-side K/V of block 0] at each token."""
  cfg = moda_config(num_layers=2)
  model = create_model(cfg)
  x = tokens()
  b, t = x.shape
  ctx = ForwardContext(positions=positions(b, t))
  blk0, blk1 = model.blocks
  h = model.embed(x)
  q0, k0, v0 = blk0.attn.project_qkv(blk0.attn_norm.norm(h), ctx)
  h = h + blk0.attn.project_out(moda_reference(q0, k0, v0))
  xc = blk0.channel_norm.norm(h)
  kf, vf = blk0.channel_side.proj(xc, ctx.positions)
  h = h + blk0.channel(xc, ctx)
  q1, k1, v1 = blk1.attn.project_qkv(blk1.attn_norm.norm(h), ctx)
  dk, dv = jnp.stack([k0, kf], axis=2), jnp.stack([v0, vf], axis=2)
  h = h + blk1.attn.project_out(moda_reference(q1, k1, v1, dk, dv))
  h = h + blk1.channel(blk1.channel_norm.norm(h), ctx)
  got = model.hidden_states(x)[-1]
  np.testing.assert_allclose(got, h, rtol=2e-5, atol=2e-5)


def test_gradient_reaches_earlier_layers_through_depth():
  """Depth K/V are not detached: block 0's FFN-side projection has no reader but block 1's
  depth attention, and its gradient is not zero."""
  model = create_model(moda_config(num_layers=2))
  x = tokens()

  def loss(model):
    return jnp.mean(model(x) ** 2)

  grads = nnx.grad(loss)(model)
  g = grads.blocks[0].channel_side.proj.k.kernel[...]
  assert float(jnp.abs(g).max()) > 0


@pytest.mark.parametrize("overrides,extra_projections", [
    ({"attention.moda.ffn_kv": False}, 0),  # Table 3 row 3: reuse only, no parameters
    ({}, 3),  # row 4, the default: FFN K/V projections in blocks 0..L-2
    ({"attention.moda.ffn_kv_last_block": True}, 4),
    ({"attention.moda.extra_attn_kv": True}, 3 + 4),  # row 5: + attention K/V projections
])
def test_variant_parameter_counts(overrides, extra_projections):
  kw = dict(num_layers=4, **overrides)
  cfg, dense_cfg = moda_config(**kw), small_config(num_layers=4, num_kv_heads=2)
  n = count_params(nnx.state(abstract_model(cfg), nnx.Param))  # shapes only: no init
  n_dense = count_params(nnx.state(abstract_model(dense_cfg), nnx.Param))
  assert n - n_dense == extra_projections * 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim


def test_flops_count_depth_logits_and_projections():
  cfg = moda_config(num_layers=3)
  md, dense = abstract_model(cfg), abstract_model(small_config(num_layers=3, num_kv_heads=2))
  hd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  depth = sum(2 * 2 * hd * s for s in (0, 2, 4))
  proj = 2 * (2 * 2 * cfg.d_model * kvd)
  assert md.flops_per_token(16) - dense.flops_per_token(16) == pytest.approx(depth + proj)


# ------------------------------------------------------------------ composition and paths

@pytest.mark.parametrize("placement", ["pre", "post", "hybridnorm", "hybridnorm_star"])
def test_moda_composes_with_placements_and_stays_causal(placement):
  model = create_model(moda_config(num_layers=3, **{"norm.kind": placement}))
  x = tokens()
  y = forward(model, x)
  y2 = forward(model, x.at[:, 10:].set((x[:, 10:] + 1) % 61))
  assert bool(jnp.all(jnp.isfinite(y)))
  np.testing.assert_allclose(y[:, :10], y2[:, :10], rtol=1e-5, atol=1e-5)
  assert not np.allclose(y[:, 10:], y2[:, 10:])


def test_extra_attention_projection_runs_and_differs():
  x = tokens()
  base = forward(create_model(moda_config(num_layers=2)), x)
  extra = forward(create_model(moda_config(num_layers=2, **{"attention.moda.extra_attn_kv": True})), x)
  assert bool(jnp.all(jnp.isfinite(extra))) and not np.allclose(base, extra)


def test_remat_matches():
  x = tokens()
  plain = create_model(moda_config(num_layers=3))
  remat = create_model(moda_config(num_layers=3, remat="block"))

  def loss(model):
    return jnp.mean(model(x) ** 2)

  np.testing.assert_allclose(forward(remat, x), forward(plain, x), rtol=1e-6, atol=1e-6)
  g1, g2 = nnx.grad(loss)(plain), nnx.grad(loss)(remat)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_pallas_kernel_path_matches_xla():
  """impl=pallas runs the kernel (interpreted on CPU) for the training forward; values and
  gradients match the jnp path."""
  x = tokens(seq=16)
  ref = create_model(moda_config(num_layers=2))
  ker = create_model(moda_config(num_layers=2, **{"attention.impl": "pallas"}))

  def loss(model):
    return jnp.mean(model(x) ** 2)

  np.testing.assert_allclose(ker(x), ref(x), rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree.leaves(nnx.grad(loss)(ker)), jax.tree.leaves(nnx.grad(loss)(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_config_errors_name_the_problem():
  with pytest.raises(config_lib.ConfigError, match="extra_attn_kv needs moda.ffn_kv"):
    create_model(moda_config(**{"attention.moda.ffn_kv": False,
                                "attention.moda.extra_attn_kv": True}))
  with pytest.raises(config_lib.ConfigError, match="impl='flash' is not available for moda"):
    create_model(moda_config(**{"attention.impl": "flash"}))
  with pytest.raises(config_lib.ConfigError, match="prefill='flexprefill' is not available"):
    create_model(moda_config(**{"attention.prefill": "flexprefill"}))
