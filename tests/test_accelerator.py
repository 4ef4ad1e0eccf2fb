"""What the accelerator path relies on, checked on CPU: the mixed-precision policy that GPUs
and TPUs use (bf16 compute, fp32 parameters, fp32 logits and loss) and the jax / flax version
check."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import research
from research import run_config
from research import experiments
from research.eval import lm_eval
from research.model import ForwardContext, compute_dtype, create_model
from research.train.trainer import Trainer

# bf16 compute against fp32 after 60 steps of the smoke model: measured 4e-5 nats apart in
# valid loss on CPU (the rounding averages out over tokens); the bound leaves room for other
# CPUs and jax releases, and still catches a policy that trains the parameters in bf16.
BF16_LOSS_TOLERANCE = 0.01


def test_bf16_policy_keeps_parameters_and_logits_fp32():
  c = run_config.resolve(experiments.get_config("baseline:scale=smoke"))
  c.model.vocab_size = 65
  assert compute_dtype("auto", "gpu") == compute_dtype("auto", "tpu") == jnp.bfloat16
  assert compute_dtype("auto", "cpu") == jnp.float32
  tokens = jax.random.randint(jax.random.key(0), (4, 32), 0, 65)
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = create_model(c.model, dtype=dtype, seed=0)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype("float32")}  # fp32 master weights
    logits[dtype] = model(tokens, ForwardContext(positions=lm_eval.positions_for(tokens)))
    assert logits[dtype].dtype == jnp.float32  # softmax and loss in fp32
  gap = float(jnp.max(jnp.abs(logits[jnp.float32] - logits[jnp.bfloat16])))
  assert 1e-4 < gap < 0.05  # bf16 really computes (measured 0.0028 of logits up to 0.8)


@pytest.mark.needs_data
def test_bf16_training_stays_near_fp32(tmp_path):
  """train.precision=bf16 forced on CPU (what `auto` picks on GPU/TPU) trains like fp32."""
  summaries = {}
  for precision in ("fp32", "bf16"):
    config = experiments.get_config("baseline:scale=smoke,corpus=tinyshakespeare", {
        "train.precision": precision, "train.steps": 60, "train.log_every": 10,
        "eval.every": 60, "train.progress": False, "mesh.num_devices": 1})
    summaries[precision] = Trainer(config, tmp_path / precision, log=lambda *_: None).run()
  fp32, bf16 = summaries["fp32"], summaries["bf16"]
  assert fp32["valid_loss"] < 3.6  # it learned (4.2 at init)
  assert abs(bf16["valid_loss"] - fp32["valid_loss"]) < BF16_LOSS_TOLERANCE
  assert abs(bf16["train_loss"] - fp32["train_loss"]) < BF16_LOSS_TOLERANCE


def test_known_broken_jax_flax_pairs_fail_at_import_with_the_fix():
  research.check_versions("0.10.2", "0.12.8")  # the CPU pair
  research.check_versions("0.11.2", "0.12.10")  # the GPU image's pair
  with pytest.raises(ImportError) as e:
    research.check_versions("0.11.2", "0.12.8")
  message = str(e.value)
  assert "\n" not in message and "flax 0.12.8" in message and "jax 0.11.2" in message
  assert "pip install 'flax>=0.12.10'" in message
