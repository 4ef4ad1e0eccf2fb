"""The compiled CPU attention kernel (kernels_cpu): values and gradients against the jnp
attention, under vmap, sharded over a mesh, in the model, and its build's errors.

Tolerance (CPU, float32): 2e-5 absolute and relative. The kernel accumulates in float32 in
another order than XLA's dots and its exp is a polynomial good to ~2 ulp; measured differences
are ~2e-6 on unit-normal inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kernels_cpu import attention as cpu_attention
from kernels_cpu import build
from research import config as config_lib
from research import run_config, sharding
from research.model import attention as attention_lib
from research.model import create_model
from tests.kernels.backends import BACKEND, needs_devices

_UNAVAILABLE = cpu_attention.unavailable()
pytestmark = [
    pytest.mark.skipif(BACKEND != "cpu", reason="the CPU kernel runs on the CPU backend"),
    pytest.mark.skipif(_UNAVAILABLE is not None,
                       reason=f"the CPU kernel cannot be built here: {_UNAVAILABLE}"),
]
TOL = dict(atol=2e-5, rtol=2e-5)


def operands(b, t, h, kv, d, seed=0, s=None):
  ks = jax.random.split(jax.random.key(seed), 4)
  s = t if s is None else s
  return (jax.random.normal(ks[0], (b, t, h, d)), jax.random.normal(ks[1], (b, s, kv, d)),
          jax.random.normal(ks[2], (b, s, kv, d)), jax.random.normal(ks[3], (b, t, h, d)))


def reference(q, k, v, causal):
  b, t = q.shape[:2]
  pos = np.broadcast_to(np.arange(t), (b, t))
  kpos = np.broadcast_to(np.arange(k.shape[1]), (b, k.shape[1]))
  return attention_lib.xla_attention(q, k, v, q_positions=pos, k_positions=kpos, causal=causal)


# (b, t, h, kv, d, causal): the tiny setting's shape; GQA; lengths and widths that are not whole
# vectors or blocks (16); one query row; long enough for several key blocks; non-causal with
# more keys than queries
SHAPES = [(12, 64, 4, 4, 32, True), (2, 37, 6, 2, 16, True), (1, 130, 2, 1, 64, True),
          (3, 5, 4, 2, 24, True), (2, 1, 2, 2, 8, True), (2, 20, 4, 2, 8, False)]


@pytest.mark.parametrize("b,t,h,kv,d,causal", SHAPES)
def test_values_and_gradients_match_the_jnp_attention(b, t, h, kv, d, causal):
  q, k, v, do = operands(b, t, h, kv, d)
  want, want_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, causal), q, k, v)
  got, got_vjp = jax.vjp(lambda q, k, v: cpu_attention.attention(q, k, v, causal=causal), q, k,
                         v)
  np.testing.assert_allclose(got, want, **TOL)
  for name, g, w in zip("qkv", got_vjp(do), want_vjp(do)):
    np.testing.assert_allclose(g, w, **TOL, err_msg=f"d{name}")


def test_non_causal_with_more_keys_than_queries():
  q, _, _, do = operands(2, 9, 4, 2, 16)
  _, k, v, _ = operands(2, 9, 4, 2, 16, seed=1, s=23)
  want, want_vjp = jax.vjp(lambda q, k, v: reference(q, k, v, False), q, k, v)
  got, got_vjp = jax.vjp(lambda q, k, v: cpu_attention.attention(q, k, v, causal=False), q, k, v)
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(got_vjp(do), want_vjp(do)):
    np.testing.assert_allclose(g, w, **TOL)


def test_causal_rows_see_only_earlier_keys():
  """Changing key 5 changes outputs at rows >= 5 only."""
  q, k, v, _ = operands(1, 12, 2, 2, 8)
  base = cpu_attention.attention(q, k, v)
  moved = cpu_attention.attention(q, k.at[:, 5].add(1.0), v.at[:, 5].add(1.0))
  changed = np.abs(np.asarray(moved - base)).max(axis=(0, 2, 3)) > 0
  assert changed.tolist() == [i >= 5 for i in range(12)]


def test_under_vmap_each_slice_is_its_own_attention():
  """Seed-stacked training vmaps the model: a leading axis (here over q only, k and v shared)
  gives each slice what the unbatched call gives, gradients included."""
  q, k, v, do = operands(2, 16, 4, 2, 8)
  qs = jnp.stack([q, 0.5 * q, -q])

  def loss(qs, k, v):
    out = jax.vmap(cpu_attention.attention, in_axes=(0, None, None))(qs, k, v)
    return jnp.sum(out * do[None])

  got, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(qs, k, v)
  want, want_grads = jax.value_and_grad(
      lambda qs, k, v: sum(jnp.sum(reference(x, k, v, True) * do) for x in qs),
      argnums=(0, 1, 2))(qs, k, v)
  np.testing.assert_allclose(got, want, **TOL)
  for g, w in zip(grads, want_grads):
    np.testing.assert_allclose(g, w, **TOL)


@needs_devices(8)
@pytest.mark.parametrize("preset,tensor", [("dp", 1), ("fsdp_tp", 2), ("fsdp_tp", 4)])
def test_sharded_equals_unsharded(preset, tensor):
  """The model's attention op runs the kernel per device shard (batch over data/fsdp, heads
  over tensor when q's and k's heads both divide): the result and gradients equal the
  single-device call's. With tensor = 4, the 2 KV heads do not divide: heads stay whole."""
  q, k, v, do = operands(8, 24, 4, 2, 16)
  pos = np.broadcast_to(np.arange(24), (8, 24))

  def loss(q, k, v):
    out = attention_lib.attention(q, k, v, q_positions=pos, k_positions=pos, impl="cpu")
    return jnp.sum(out * do)

  want = jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)
  mesh = sharding.make_mesh(preset, tensor=tensor)
  with sharding.use_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
    text = jax.jit(loss).lower(q, k, v).as_text()
  assert "shard_map" in text or "sdy.manual_computation" in text
  np.testing.assert_allclose(got[0], want[0], **TOL)
  for g, w in zip(got[1], want[1]):
    np.testing.assert_allclose(g, w, **TOL)


def test_model_on_auto_runs_the_kernel_and_matches_the_jnp_model():
  """The default impl (auto) runs the kernel on CPU; a model's logits and gradients under it
  equal the jnp attention's (impl=xla) within the tolerance."""
  def model(impl):
    c = run_config.default_config()
    config_lib.apply_overrides(c, {"model.vocab_size": 61, "model.num_layers": 2,
                                   "model.d_model": 32, "model.num_heads": 4,
                                   "model.num_kv_heads": 2, "model.attention.impl": impl})
    return create_model(run_config.resolve(c).model)

  assert attention_lib.resolve_impl("auto") == "cpu"
  tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, 61)

  def loss(m):
    return jnp.mean(jax.nn.log_softmax(m(tokens)) ** 2)

  fast, plain = model("auto"), model("xla")
  text = jax.jit(lambda t: fast(t)).lower(tokens).as_text()
  assert cpu_attention.HANDLERS[0][0] in text
  (lf, gf), (lp, gp) = (nnx.value_and_grad(loss)(m) for m in (fast, plain))
  np.testing.assert_allclose(lf, lp, **TOL)
  for a, b in zip(jax.tree.leaves(nnx.state(gf)), jax.tree.leaves(nnx.state(gp))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_unsupported_operands_are_named():
  q, k, v, _ = operands(1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="float32"):
    cpu_attention.attention(q.astype(jnp.bfloat16), k, v)
  with pytest.raises(ValueError, match="3 query heads do not divide into 2"):
    cpu_attention.attention(q[:, :, :3], k, v)
  with pytest.raises(ValueError, match="as many queries as keys"):
    cpu_attention.attention(q[:, :5], k, v)
  with pytest.raises(ValueError, match="no heads"):
    cpu_attention.attention(q, k[:, :, :0], v[:, :, :0])


def test_the_op_falls_back_to_jnp_outside_the_kernel():
  """bf16 operands, a key-validity mask or an explicit mask run the jnp path under impl=cpu."""
  q, k, v, _ = operands(1, 8, 4, 2, 8)
  pos = np.broadcast_to(np.arange(8), (1, 8))
  lowered = lambda f: jax.jit(f).lower(q, k, v).as_text()  # noqa: E731
  for kwargs, cast in (({}, jnp.bfloat16), ({"k_valid": jnp.ones((1, 8), bool)}, None),
                       ({"mask": jnp.ones((1, 8, 8), bool)}, None)):
    def f(q, k, v, kwargs=kwargs, cast=cast):
      if cast is not None:
        q, k, v = (x.astype(cast) for x in (q, k, v))
      return attention_lib.attention(q, k, v, q_positions=pos, k_positions=pos, impl="cpu",
                                     **kwargs)
    assert cpu_attention.HANDLERS[0][0] not in lowered(f), kwargs


def test_impl_resolution():
  assert attention_lib.resolve_impl("auto", "gpu") == attention_lib.resolve_impl("auto", "tpu") \
      == "xla"
  assert attention_lib.resolve_impl("auto", "cpu") == "cpu"
  assert attention_lib.resolve_impl("pallas", "cpu") == "pallas"
  with pytest.raises(ValueError, match="impl=cpu runs on CPU only"):
    attention_lib.resolve_impl("cpu", "gpu")


def test_build_caches_the_library(tmp_path, monkeypatch):
  """A build goes to the cache directory; a second one reuses the file."""
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
  path = build.build(cpu_attention.SOURCE)
  assert path.parent == tmp_path and path.exists()
  stamp = path.stat().st_mtime_ns
  assert build.build(cpu_attention.SOURCE) == path and path.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no partial file left


def test_build_errors_name_the_problem(tmp_path, monkeypatch):
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
  monkeypatch.setenv("CXX", "no-such-compiler-here")
  with pytest.raises(build.KernelBuildError, match="CXX=no-such-compiler-here is not a compiler"):
    build.build(cpu_attention.SOURCE)
  monkeypatch.delenv("CXX")
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler found"):
    build.build(cpu_attention.SOURCE)


def test_a_cache_directory_that_cannot_be_made_is_a_build_error(tmp_path, monkeypatch):
  """Under auto such an error means the jnp path with a warning, not a crash."""
  (tmp_path / "file").write_text("")
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path / "file" / "cache"))
  with pytest.raises(build.KernelBuildError, match="failed"):
    build.build(cpu_attention.SOURCE)


def test_a_failed_compile_shows_the_compiler_output(tmp_path, monkeypatch):
  monkeypatch.setenv(build.CACHE_ENV, str(tmp_path))
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++;\n")
  monkeypatch.setattr(build, "_SOURCES", tmp_path)
  with pytest.raises(build.KernelBuildError, match="building broken.cc failed"):
    build.build("broken.cc")
  assert not list(tmp_path.glob("*.so"))
