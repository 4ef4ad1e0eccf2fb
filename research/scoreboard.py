"""`research scoreboard`: every paper's headline arm against its own baseline, in one table.

Which rows: each experiment declares in its sweep.py the arms that embody the paper's method,
`Sweep(headline=(Headline(group, arm), ...))` (research/experiments.py), each compared with
its group's reference arm or a `baseline` it names; an experiment added with a declaration
appears here with no change to this module, and one without (a learning-rate sweep, a scaling
study) has no row. Everything is read from the committed results
(experiments/<name>/results/results.json, what `research report` writes), never from a runs
directory; the configs are rebuilt (abstractly, nothing is trained) only for the shapes, the
settings and, where a row predates summaries that carried them, the FLOPs.

Per row:
  shape      layers x width of the baseline's resolved config (KV heads where they are grouped)
  Δ loss     mean valid loss of the arm minus its baseline's, with a 95% interval
             (research/verdict.py `interval`): the paired differences when both arms finished
             every seed (seed i of each: the same data order and init), else Welch's
  Δ params   total parameters (activated ones in brackets where they differ: MoE, memory)
  Δ FLOPs    forward FLOPs per token, as results.json has them (the runs' summaries), or, marked
             †, from the config's abstract model at the vocabulary that reproduces the row's
             parameter count
  Δ step     measured seconds per step (means over seeds; the sweeps shared a 2-core CPU, so a
             rough guide)
  verdict    the report's word for the arm (results.json's `verdict`, by research/verdict.py
             against the arm's claim); against a baseline other than the group's reference, the
             same rule on the per-seed values against the headline's own claim; "no claim"
             where the paper makes none at this scale, "superseded" for a group whose
             comparison the sweep marks unfair
  setting    where the baseline's config differs from the common scoreboard setting (below),
             and where the arm differs from its baseline in shape, init, data or training
             beyond what the table varies on purpose: such a row is not like-for-like

The common scoreboard setting is defined once, in research/scales.py (`COMMON_ARG`, then
`apply_common_setting`; `common_config` here): the shared tiny scale on character-level Tiny
Shakespeare (4 x 128, context 64, batch 12, 2000 steps) with the init and optimizer most wave-1
experiments share (std 1/sqrt(2.5 d), output projections scaled 1/sqrt(2L), AdamW β2 0.95),
i.e. the dense baseline row that sdd, polycom, ultramem, ultramem_v2 and hybridnorm share. The
Markdown header says why and counts how many rows are at it.

The common group. Every sweep that declares headlines has a derived group `common`
(experiments.get_sweep adds it; `common_group` here derives it): each headline's baseline and
arm, named as in their own group, at the common setting. Its arms take every SETTING key of
kind shape / init / run from the common setting, except a key the arm's own overrides set and
its group `varies` (the method), and keep the experiment's "model" keys (the architecture);
the rules, the FFN width's among them, are `_common_overrides`'. `research sweep NAME --group
common --skip_reported` trains only what no committed row reports (the common dense baseline
is polycom's `swiglu` and sdd's `pre` row; an experiment already at the common setting trains
nothing), and `research report NAME` adds the group to its results.json. A headline's row is
then its common group's (like-for-like, the row at the experiment's own setting kept as
`Row.own`, shown as "Δ at its own setting"); until then the row is its own, and the section
"Not yet at the common setting" gives the command and the runs it trains (`Todo`). Nothing
here lists experiments: a new one with headlines has its common group and its row with no
change.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # drawn off-screen, without touching pyplot's backend

from research import config as config_lib
from research import experiments, report, run_config, verdict
from research.errors import ConfigError, ResearchError
from research.experiments import COMMON_GROUP
from research.scales import COMMON_ARG, SCALE_ARGS, apply_common_setting, scaled_config

COMMON_WHY = (
    "it is the setting most wave-1 experiments share: the shared `tiny` scale's 4 × 128 shape "
    "(the residual-stream papers went 16 × 64 deep and narrow, MoDA 12 × 128), with the init "
    "and optimizer of hybridnorm, sdd, polycom, ultramem, ultramem_v2 and the residual-stream "
    "papers' fair tables (std 1/√(2.5d), AdamW β2 0.95), whose dense baseline (one config) five "
    "experiments report; the default std 0.02, which the MoDA, MoE-router and recurrent-mixer "
    "experiments kept, handicaps a pre-norm baseline by 0.06 nats at 16 × 64 "
    "(experiments/hyper_connections), so gains measured over it may be part repair")
# (label, dotted key, kind): what a baseline is compared on with the common setting. A
# difference in "shape" or "init" makes a row not like-for-like, and so does one in "run" (data,
# budget, optimizer); "model" only names the baseline's architecture where it is not the common
# dense decoder (the paper's own baseline: an MoE for a router, DeltaNet for DeltaProduct).
SETTING = (
    ("layers", "model.num_layers", "shape"), ("width", "model.d_model", "shape"),
    ("heads", "model.num_heads", "shape"), ("KV heads", "model.num_kv_heads", "shape"),
    ("init std", "model.init_std", "init"), ("output init", "model.init_out_scaling", "init"),
    ("corpus", "data.corpus", "run"), ("tokenizer", "data.tokenizer", "run"),
    ("context", "data.seq_len", "run"), ("batch", "train.batch_size", "run"),
    ("steps", "train.steps", "run"), ("optimizer", "train.optimizer", "run"),
    ("lr", "train.lr", "run"), ("schedule", "train.schedule", "run"),
    ("β1", "train.b1", "run"), ("β2", "train.b2", "run"),
    ("weight decay", "train.weight_decay", "run"),
    ("attention", "model.attention.kind", "model"), ("channel", "model.channel.kind", "model"),
    ("FFN width", "model.channel.d_ff", "model"),
    ("activation", "model.channel.activation", "model"), ("norm", "model.norm.kind", "model"),
    ("residual", "model.residual.kind", "model"), ("linear", "model.linear.kind", "model"),
    ("embedding", "model.embed.kind", "model"), ("head", "model.head.kind", "model"),
    ("tied head", "model.head.tie_embeddings", "model"),
)
SUPERSEDED = "superseded"  # the verdict cell of a group the sweep marks unfair (Sweep.superseded)
NO_CLAIM = "no claim"
COLORS = {"reproduced": "tab:green", "contradicted": "tab:red", "not resolved": "tab:gray"}


class ScoreboardError(ResearchError):
  """Nothing to put on the scoreboard: no committed results, or no experiment declares a row."""


@dataclasses.dataclass
class Todo:
  """What measures a row at the common setting: its experiment's common group, where the
  arms that no committed row reports train (`--skip_reported` shows the others)."""
  experiment: str
  train: list[str] = dataclasses.field(default_factory=list)  # arms to train
  reused: dict[str, str] = dataclasses.field(default_factory=dict)  # arm -> the row reporting it
  seeds: int = 3
  configs: list[dict] = dataclasses.field(default_factory=list)  # what trains (resolved)
  differs: list[str] = dataclasses.field(default_factory=list)  # still off the common setting
  why: str = ""  # the common group cannot be built: why

  @property
  def runs(self) -> int:
    return len(self.train) * self.seeds

  @property
  def commands(self) -> tuple[str, str]:
    return (f"research sweep {self.experiment} --group {COMMON_GROUP} --skip_reported",
            f"research report {self.experiment}")


@dataclasses.dataclass
class Row:
  """One headline arm against its baseline (the numbers are None where not measured)."""
  experiment: str
  group: str
  arm: str
  baseline: str
  shape: str = "?"
  loss: float | None = None  # the baseline's mean valid loss
  interval: verdict.Interval | None = None
  seeds: str = ""
  params: tuple[float, float] | None = None  # (baseline, arm)
  activated: tuple[float, float] | None = None
  flops: tuple[float, float] | None = None
  flops_computed: bool = False
  step: tuple[float, float] | None = None
  verdict: str = ""
  # not like-for-like: kind ("shape", "init", "run", "config") -> the differences
  differs: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  notes: list[str] = dataclasses.field(default_factory=list)  # the baseline's architecture
  own: Row | None = None  # measured in the common group: the row at the experiment's setting
  todo: Todo | None = None  # not yet at the common setting: what measures it there

  @property
  def at_common(self) -> bool:
    """Whether the numbers are the experiment's `common` group's."""
    return self.group == COMMON_GROUP

  @property
  def measured(self) -> bool:
    return self.interval is not None

  @property
  def like_for_like(self) -> bool:
    return not self.differs

  @property
  def setting(self) -> list[str]:
    return [text for texts in self.differs.values() for text in texts]

  @property
  def flops_frac(self) -> float | None:
    return None if not self.flops or not self.flops[0] else self.flops[1] / self.flops[0] - 1


@dataclasses.dataclass
class Board:
  rows: list[Row]  # measured and not (yet) measured
  common: dict  # key -> value of the common setting
  without: list[str]  # experiments with results but no headline declared
  problems: list[str]  # experiments that could not be read, and why
  date: str = dataclasses.field(default_factory=lambda: datetime.date.today().isoformat())


def common_config(arg: str = COMMON_ARG):
  """The common scoreboard setting's resolved config (defined in research/scales.py); at another
  argument's scale with `arg` (a common group's argument, e.g. at `scale=smoke`)."""
  return run_config.resolve(_common_setting(arg))


def _common_setting(arg: str):
  """The common setting's unresolved config at `arg`'s shared keys (scale, corpus, ...)."""
  shared = {k: v for k, v in _pairs(arg).items() if k in SCALE_ARGS}
  return apply_common_setting(scaled_config(_join(shared), "scoreboard")[0])


# ------------------------------------------------------------------------- the common group
#
# Every sweep with headlines gets a derived group `common` (experiments.get_sweep): each
# headline's arm and baseline, named as in their own group, with the rules below. Its rows are
# the like-for-like ones: every experiment's method against the same baseline at one setting.

# SETTING kinds the common group sets to the common setting ("model" keys are the paper's
# architecture, the method's or its baseline's: kept)
COMMON_KINDS = ("shape", "init", "run")
FFN_WIDTH = "model.channel.d_ff"


def _pairs(arg: str) -> dict[str, str]:
  return dict(p.split("=", 1) for p in arg.split(",") if "=" in p)


def _join(pairs: dict[str, str]) -> str:
  return ",".join(f"{k}={v}" for k, v in pairs.items())


def common_arg(sweep_arg: str, arg: str = "") -> str:
  """The argument of an experiment's common group: COMMON_ARG, with the keys of the sweep's
  own argument that are the experiment's (a `variant`; not the shared scale, corpus,
  tokenizer, seed) and then `arg`'s (`research sweep NAME --group common --arg scale=smoke`:
  the common setting at the smoke scale)."""
  own = {k: v for k, v in _pairs(sweep_arg).items() if k not in SCALE_ARGS}
  return _join({**_pairs(COMMON_ARG), **own, **_pairs(arg)})


def _common_overrides(experiment: str, sweep, group: str, arm, target: dict, keep) -> dict:
  """The overrides of `arm` (an experiments.Arm of `group`, a headline's) in the common group.

  Rules: every SETTING key of kind shape / init / run takes the common setting's value
  (`target`, unresolved), except where the arm's own overrides set a key that its group
  `varies` (that is the method: the low-bit optimizer's settings, SPARKLING's expansion; a key
  the table varies through other arms, as MoDA's 13-block row, is not this arm's method) and
  the keys in `keep` (run keys without which some arm of the group does not build:
  `common_group`). "model" keys stay the experiment's. The FFN width: when the width changes,
  a width the arm's overrides set (parameter matching, a dense FFN at the MoE's parameters)
  is scaled with it, to a multiple of 8, which keeps the match (every term of a block grows as
  d_model x width); one the experiment's config set at its own shape goes back to the common
  setting's (0: derived from the width)."""
  own = experiments.get_config(f"{experiment}:{sweep.arg_of(group)}", arm.overrides)
  varies = sweep.varies.get(group, ())
  carg = sweep.arg_of(COMMON_GROUP)
  at = experiments.get_config(f"{experiment}:{carg}", arm.overrides).to_dict()
  out = dict(arm.overrides)
  for _, key, kind in SETTING:
    if kind not in COMMON_KINDS or key in keep or (key in varies and key in arm.overrides):
      continue
    value = config_lib.get_dotted(target, key)
    if config_lib.get_dotted(at, key) != value:
      out[key] = value
  width = out.get("model.d_model", config_lib.get_dotted(at, "model.d_model"))
  ffn = config_lib.get_dotted(at, FFN_WIDTH)
  if width != own.model.d_model and ffn:
    if FFN_WIDTH in arm.overrides:
      out[FFN_WIDTH] = max(8, 8 * round(ffn * width / own.model.d_model / 8))
    else:
      out[FFN_WIDTH] = config_lib.get_dotted(target, FFN_WIDTH)
  return out


def common_group(experiment: str, sweep, arg: str = ""
                 ) -> tuple[str, list[experiments.Arm], dict[str, str]]:
  """(argument, arms, kept) of the experiment's common group (`sweep` without one): for each
  headline its baseline and its arm, named as in their own group (an arm shared by two
  headlines once), by `_common_overrides`; an arm keeps its claim (against a named baseline,
  the headline's claim), a baseline has none. `kept`: run key -> why it keeps the
  experiment's own value in every arm of the group: the common value made an arm's config
  invalid (SPARKLING expands at step 2000, which needs more than the common 2000 steps); the
  scoreboard shows that difference. `arg`: as `common_arg`'s. Raises ExperimentError when an
  arm cannot be built at the common setting, or two groups' arms of one name differ."""
  carg = common_arg(sweep.arg, arg)
  sweep = dataclasses.replace(sweep, args={**sweep.args, COMMON_GROUP: carg})
  target = _common_setting(carg).to_dict()
  kept: dict[str, str] = {}

  def arms() -> tuple[list[experiments.Arm], dict[str, experiments.Arm]]:
    out, own = {}, {}  # name -> the arm in the common group, in its own group
    for h in sweep.headline:
      by_name = {a.name: a for a in sweep.groups[h.group]}
      base = h.baseline or sweep.reference(h.group)
      for name, claim in ((base, None), (h.arm, h.claim if h.baseline else by_name[h.arm].claim)):
        arm = by_name[name]
        overrides = _common_overrides(experiment, sweep, h.group, arm, target, kept)
        if name in out and out[name].overrides != overrides:
          raise experiments.ExperimentError(
              f"the common group of '{experiment}' would have two arms named '{name}' that "
              "differ")
        if name not in out or claim:
          out[name], own[name] = experiments.Arm(name, overrides, arm.paper, claim), arm
    return list(out.values()), own

  while True:
    group, own = arms()
    failure = _first_invalid(experiment, carg, group)
    if failure is None:
      return carg, group, kept
    arm, err = failure
    mine = experiments.get_config(f"{experiment}:{carg}", own[arm.name].overrides).to_dict()
    for key in _keys("run"):
      value = config_lib.get_dotted(mine, key)
      if key in kept or arm.overrides.get(key, value) == value:
        continue
      trial = dataclasses.replace(arm, overrides={**arm.overrides, key: value})
      if _first_invalid(experiment, carg, [trial]) is None:
        kept[key] = f"{arm.name} at the common {key.split('.')[-1]}: {err}"
        break
    else:
      raise experiments.ExperimentError(
          f"arm '{arm.name}' of '{experiment}' does not build at the common setting: {err}")


def _keys(kind: str) -> list[str]:
  """The SETTING keys of one kind."""
  return [key for _, key, k in SETTING if k == kind]


def _first_invalid(experiment: str, arg: str, arms) -> tuple | None:
  """(arm, the error's message) of the first arm whose config does not resolve, or None."""
  for arm in arms:
    try:
      run_config.resolve(experiments.get_config(f"{experiment}:{arg}", arm.overrides))
    except ConfigError as err:
      return arm, str(err)
  return None


def with_common_group(experiment: str, sweep, arg: str = ""):
  """`sweep` with its derived common group (`common_group`), its argument, reference (the first
  headline's baseline) and varies (the union of the headlines' groups'); where the group
  cannot be built, `sweep.unavailable` says why."""
  try:
    carg, arms, _ = common_group(experiment, sweep, arg)
  except ResearchError as err:
    return dataclasses.replace(sweep, unavailable={**sweep.unavailable, COMMON_GROUP: str(err)})
  first = sweep.headline[0]
  varies = tuple(dict.fromkeys(k for h in sweep.headline for k in sweep.varies.get(h.group, ())))
  return dataclasses.replace(
      sweep, groups={**sweep.groups, COMMON_GROUP: arms},
      args={**sweep.args, COMMON_GROUP: carg},
      references={**sweep.references,
                  COMMON_GROUP: first.baseline or sweep.reference(first.group)},
      varies={**sweep.varies, COMMON_GROUP: varies})


def _resolved(experiment: str, arg: str, overrides: dict):
  return run_config.resolve(experiments.get_config(f"{experiment}:{arg}", overrides))


def _setting(c) -> dict:
  """key -> value of every SETTING key of a resolved config (None where it has none)."""
  flat = c.to_dict()
  return {key: config_lib.get_dotted(flat, key) for _, key, _ in SETTING}


def _show(key: str, value) -> str:
  if key == "model.init_std" and value == 0:
    return "1/√(2.5d)"
  if isinstance(value, bool):
    return "yes" if value else "no"
  return f"{value:g}" if isinstance(value, float) else str(value)


def _text(label: str, key: str, value) -> str:
  return f"{label}{':' if isinstance(value, bool) else ''} {_show(key, value)}"


def _shape(c) -> str:
  m = c.model
  kv = f" (KV {m.num_kv_heads})" if m.num_kv_heads != m.num_heads else ""
  return f"{m.num_layers}×{m.d_model}{kv}"


def _setting_differences(base, arm, common, varies) -> tuple[dict[str, list[str]], list[str]]:
  """(kind -> why the row is not like-for-like, notes on the baseline's architecture): the
  baseline against the common setting, the arm against its baseline outside `varies`."""
  why, notes = {}, []
  base, arm = _setting(base), _setting(arm)
  for label, key, kind in SETTING:
    value = base[key]
    if value != common[key]:
      (notes if kind == "model" else why.setdefault(kind, [])).append(_text(label, key, value))
    mine = arm[key]
    if kind != "model" and key not in varies and mine != value:
      why.setdefault(kind, []).append("arm's " + _text(label, key, mine))
  return why, notes


def _computed_flops(c, params: float) -> float | None:
  """Forward FLOPs per token of the resolved config `c` at the vocabulary size that gives the
  row's `params` (both are affine in it), from its abstract model; None where none does."""
  at = {v: _summary(json.dumps({**c.model.to_dict(), "vocab_size": v}, sort_keys=True),
                    c.data.seq_len) for v in (256, 512)}
  per_row = (at[512][0] - at[256][0]) / 256
  vocab = 256 + (params - at[256][0]) / per_row if per_row > 0 else -1.0
  if vocab < 1 or abs(vocab - round(vocab)) > 1e-6:
    return None
  return at[256][1] + (round(vocab) - 256) * (at[512][1] - at[256][1]) / 256


@functools.lru_cache(maxsize=None)
def _summary(model_json: str, seq_len: int) -> tuple[float, float]:
  """(params, forward FLOPs per token) of a model section (sorted JSON), built abstractly."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from research.model.lm import abstract_model, model_summary  # pylint: disable=import-outside-toplevel
  s = model_summary(abstract_model(ml_collections.ConfigDict(json.loads(model_json))), seq_len)
  return float(s["params"]), float(s["flops_per_token_fwd"])


def _pair(base: dict, arm: dict, key: str) -> tuple[float, float] | None:
  a, b = base.get(key), arm.get(key)
  return None if a is None or b is None else (float(a), float(b))


def _seeds_pair(base: dict, arm: dict) -> bool:
  """Whether index i of both rows' per-seed values is the same seed: every seed finished."""
  return all(r.get("seeds_finished") == r.get("seeds_total") for r in (base, arm)) and (
      len(base["valid_loss"]["values"]) == len(arm["valid_loss"]["values"]))


def _verdict(h, sweep, group: dict, base: dict, arm: dict, baseline: str) -> str:
  if group.get("superseded") or sweep.superseded.get(h.group):
    return SUPERSEDED
  values, reference = arm["valid_loss"]["values"], base["valid_loss"]["values"]
  if h.claim is None and baseline == group.get("reference", sweep.reference(h.group)):
    if arm.get("verdict"):
      return arm["verdict"]  # the report's word (research/verdict.py)
    claim = next((a.claim for a in sweep.groups[h.group] if a.name == h.arm), None)
  else:
    claim = h.claim
  if claim is None:
    return NO_CLAIM
  return verdict.verdict(verdict.compare(values, reference), claim)


def _row(name: str, sweep, h, groups: dict[str, dict], common) -> Row:
  baseline = h.baseline or sweep.reference(h.group)
  group = groups.get(h.group) or {}
  by_arm = {r["arm"]: r for r in group.get("arms", [])}
  defined = {a.name: a.overrides for a in sweep.groups[h.group]}
  base, arm = by_arm.get(baseline, {}), by_arm.get(h.arm, {})
  row = Row(name, h.group, h.arm, baseline)
  arg = group.get("arg") or sweep.arg_of(h.group)
  try:
    base_c = _resolved(name, arg, base.get("overrides", defined[baseline]))
    arm_c = _resolved(name, arg, arm.get("overrides", defined[h.arm]))
  except Exception as err:  # noqa: BLE001  (a config today's code no longer builds)
    base_c = arm_c = None
    row.differs["config"] = [f"config does not build today ({type(err).__name__})"]
  if base_c is not None:
    row.shape = _shape(base_c) + ("" if _shape(arm_c) == _shape(base_c)
                                  else f" (arm {_shape(arm_c)})")
    row.differs, row.notes = _setting_differences(base_c, arm_c, common,
                                                  sweep.varies.get(h.group, ()))
  measured = [(r.get("valid_loss") or {}).get("values") for r in (base, arm)]
  if not all(measured):
    return row
  paired = _seeds_pair(base, arm)
  row.loss = base["valid_loss"]["mean"]
  row.interval = verdict.interval(arm["valid_loss"]["values"], base["valid_loss"]["values"],
                                  paired)
  n_arm, n_base = len(measured[1]), len(measured[0])
  row.seeds = f"{n_arm} paired" if paired else f"{n_arm} vs {n_base}, Welch"
  row.params = _pair(base, arm, "params")
  row.activated = _pair(base, arm, "params_activated")
  row.step = _pair(base, arm, "step_time_s")
  row.flops = _pair(base, arm, "flops_per_token_fwd")
  if row.flops is None and base_c is not None and row.params is not None:
    try:
      flops = (_computed_flops(base_c, row.params[0]), _computed_flops(arm_c, row.params[1]))
    except Exception:  # noqa: BLE001  (no FLOPs then: the cell shows a dash)
      flops = (None, None)
    if None not in flops:
      row.flops, row.flops_computed = flops, True
  row.verdict = _verdict(h, sweep, group, base, arm, baseline)
  return row


class _Reported:
  """The committed rows of every experiment (sweep.ReportedRows, read once, when first asked)."""

  def __init__(self, root: Path):
    self.root, self._rows = root, None

  def find(self, config, seeds: int):
    from research.sweep import ReportedRows  # pylint: disable=import-outside-toplevel
    if self._rows is None:
      self._rows = ReportedRows(self.root)
    return self._rows.find(config, seeds)


def _at_common(name: str, sweep, h, groups: dict[str, dict], common, reported) -> Row:
  """The headline's row: its common group's where results.json has that row measured (with
  the row at the experiment's own setting as `own`), else its own with `todo` saying what
  measures it at the common setting (none where its own arms are the common group's)."""
  own = _row(name, sweep, h, groups, common)
  if COMMON_GROUP not in sweep.groups and COMMON_GROUP not in sweep.unavailable:
    return own  # a sweep loaded without it (experiments.get_sweep(common=False))
  if COMMON_GROUP in sweep.unavailable:
    own.todo = Todo(name, why=sweep.unavailable[COMMON_GROUP])
    return own
  base = h.baseline or sweep.reference(h.group)
  claim = h.claim if h.baseline else next(a.claim for a in sweep.groups[h.group]
                                          if a.name == h.arm)
  row = _row(name, sweep, experiments.Headline(COMMON_GROUP, h.arm, base, claim), groups, common)
  if row.measured:
    row.own = own
    return row
  own.todo = _todo(name, sweep, h, base, common, reported)
  return own


def _todo(name: str, sweep, h, base: str, common, reported) -> Todo | None:
  """What the common group trains for this headline's arm and baseline: those no committed row
  reports with every seed; None where both configs are their own group's already (the row is
  at the common setting as it stands)."""
  from research.sweep import same_config  # pylint: disable=import-outside-toplevel
  arms = (base, h.arm)
  mine = {a.name: a for a in sweep.groups[COMMON_GROUP]}
  own = {a.name: a for a in sweep.groups[h.group]}
  carg = sweep.arg_of(COMMON_GROUP)
  configs = {a: _resolved(name, carg, mine[a].overrides) for a in arms}
  if all(same_config(_resolved(name, sweep.arg_of(h.group), own[a].overrides).to_dict(),
                     configs[a].to_dict()) for a in arms):
    return None
  differs, _ = _setting_differences(configs[base], configs[h.arm], common,
                                    sweep.varies.get(COMMON_GROUP, ()))
  todo = Todo(name, seeds=sweep.seeds, differs=[t for texts in differs.values() for t in texts])
  for a in arms:
    twin = reported.find(experiments.get_config(f"{name}:{carg}", mine[a].overrides),
                         sweep.seeds)
    if twin is None:
      todo.train.append(a)
      todo.configs.append(configs[a].to_dict())
    else:
      todo.reused[a] = twin[0]
  return todo


def build() -> Board:
  """Every declared headline row, from the committed results of every experiment."""
  root = experiments.experiments_dir()
  names = experiments.list_experiments()
  with_results = [n for n in names if (root / n / "results" / "results.json").is_file()]
  if not with_results:
    raise ScoreboardError(f"no committed results under {root}/*/results/results.json; measure an "
                          "experiment first (`research sweep NAME`, then `research report NAME`)")
  common = _setting(common_config())
  rows, without, problems = [], [], []
  reported = _Reported(root)
  for name in names:
    try:
      sweep = experiments.get_sweep(name)
      if not sweep.headline:
        if name in with_results:
          without.append(name)
        continue
      groups = {g["group"]: g for g in report.experiment_groups(name, root, {})}
      rows += [_at_common(name, sweep, h, groups, common, reported) for h in sweep.headline]
    except Exception as err:  # noqa: BLE001  (one unreadable experiment does not hide the rest)
      problems.append(f"{name}: {type(err).__name__}: {err}")
  if not rows:
    raise ScoreboardError(
        "no experiment declares a headline arm (Sweep(headline=(Headline(group, arm), ...)) in "
        "its sweep.py)" + (f"; unreadable: {'; '.join(problems)}" if problems else ""))
  return Board(rows, common, without, problems)


def by_loss(rows: list[Row]) -> list[Row]:
  """Measured rows, largest gain (most negative Δ loss) first."""
  return sorted((r for r in rows if r.measured),
                key=lambda r: (r.interval.delta, r.experiment, r.arm))


FREE = 1e-3  # Δ FLOPs below +0.1%: no extra forward compute


def by_loss_per_flops(rows: list[Row]) -> list[Row]:
  """Measured rows with FLOPs: first those with no extra forward compute (Δ FLOPs <= +0.1%)
  by Δ loss, then the others by Δ loss per +10% FLOPs (most loss bought per FLOP first)."""
  def key(r):
    if r.flops_frac <= FREE:
      return (0, r.interval.delta, r.experiment, r.arm)
    return (1, r.interval.delta / (10 * r.flops_frac), r.experiment, r.arm)
  return sorted((r for r in by_loss(rows) if r.flops_frac is not None), key=key)


# ---------------------------------------------------------------------------------- Markdown

def signed(v: float, digits: int = 4) -> str:
  """A signed number. A value that rounds to zero keeps its sign (-0.0000: on an interval's
  bound the sign says on which side of zero the bound lies), unless it is zero up to float
  round-off (|v| < 1e-9), which prints as +0.0000."""
  return f"{0.0 if abs(v) < 1e-9 else v:+.{digits}f}"


def delta_cell(i: verdict.Interval) -> str:
  if math.isnan(i.low):
    return f"{signed(i.delta)} [n/a]"
  return f"{signed(i.delta)} [{signed(i.low)}, {signed(i.high)}]"


def count_cell(v: float) -> str:
  """A signed count: millions with three decimals from 10,000 up, whole numbers below."""
  return f"{v / 1e6:+.3f}M" if abs(v) >= 1e4 else f"{v:+,.0f}"


def _relative(pair, fmt) -> str:
  if pair is None:
    return "—"
  a, b = pair
  if a == b:
    return "0"
  return f"{fmt(b - a)} ({100 * (b / a - 1):+.1f}%)" if a else fmt(b - a)


def _params_cell(r: Row) -> str:
  cell = _relative(r.params, count_cell)
  delta = lambda pair: pair[1] - pair[0]  # noqa: E731
  if r.activated and r.params and delta(r.activated) != delta(r.params):
    cell += f"; activated {_relative(r.activated, count_cell)}"
  return cell


def _flops_cell(r: Row) -> str:
  return _relative(r.flops, lambda v: f"{v / 1e6:+.3f}M") + (" †" if r.flops_computed else "")


def _step_cell(r: Row) -> str:
  return _relative(r.step, lambda v: f"{1e3 * v:+.0f} ms")


def _setting_cell(r: Row) -> str:
  cell = ("like-for-like" if r.like_for_like else
          "**not like-for-like**: " + ", ".join(r.setting))
  return cell + (f" ({COMMON_GROUP} group)" if r.at_common else "")


def _name(r: Row) -> str:
  group = f"{COMMON_GROUP}; own: {r.own.group}" if r.at_common and r.own else r.group
  return f"{r.arm.replace('|', '/')} ({group})"


def _own_cell(r: Row) -> str:
  """The experiment's own comparison, where the row is its common group's."""
  if not r.at_common:
    return "—"
  own = r.own
  if own is None or not own.measured:
    return "not measured"
  return delta_cell(own.interval) + ("" if own.shape == r.shape else f" at {own.shape}")


def _baseline_cell(r: Row) -> str:
  return r.baseline + (f" ({', '.join(r.notes)})" if r.notes else "")


def _header(board: Board) -> list[str]:
  c = board.common
  measured = [r for r in board.rows if r.measured]
  same_shape = sum("shape" not in r.differs for r in measured)
  same_init = sum("init" not in r.differs for r in measured)
  at_common = sum(r.at_common for r in measured)
  as_is = sum(not r.at_common and r.todo is None for r in measured)
  return [
      "# Scoreboard: every paper's headline arm at a glance", "",
      f"Generated by `research scoreboard` on {board.date} from the committed results "
      "(experiments/*/results/results.json; no runs are read); `research report NAME` "
      "regenerates it. Do not edit by hand. Each experiment's sweep.py declares its rows "
      "(`Sweep(headline=...)`: the arms that embody the paper's method, each against its own "
      "baseline), its README says what they mean.", "",
      f"**The common scoreboard setting** (`{COMMON_ARG}` with `apply_common_setting`, both "
      f"in research/scales.py): {c['model.num_layers']} blocks × width {c['model.d_model']}, "
      f"{c['model.num_heads']} heads, SwiGLU {c['model.channel.d_ff']}, context "
      f"{c['data.seq_len']}, batch {c['train.batch_size']}, {c['train.steps']} steps, AdamW "
      f"lr {c['train.lr']:g} (β {c['train.b1']:g}, {c['train.b2']:g}), {c['train.schedule']}, "
      f"weight decay {c['train.weight_decay']:g}, "
      f"init std {_show('model.init_std', c['model.init_std'])} "
      f"(output projections: {c['model.init_out_scaling']}), {c['data.tokenizer']}-level "
      f"{c['data.corpus']}. Why this one: {COMMON_WHY}. Of the {len(measured)} measured rows, "
      f"{same_shape} have a baseline of its shape, {same_init} of its init, "
      f"{sum(r.like_for_like for r in measured)} are like-for-like in every respect. A row "
      "whose baseline (or arm, beyond what its table varies) differs from it in shape, init, "
      "data or training says so in the last column: its Δ is its own paper's comparison, not "
      "one to add to another row's. Every experiment with a headline also has a derived sweep "
      f"group `{COMMON_GROUP}` (research/scoreboard.py `common_group`): its headline arms and "
      "their baselines at the common setting (shape, init, data and training from it; what the "
      "table varies on purpose, and the paper's architecture, from the experiment). A row is "
      f"that group's where the experiment's results hold it ({at_common} of the "
      f"{len(measured)} measured rows; the column \"Δ at its own setting\" keeps the "
      f"experiment's own comparison); {as_is} rows are at the common setting as they stand "
      "(their arms are the common group's); the section \"Not yet at the common setting\" "
      "gives, for every other row, the command that measures it there and the runs it trains.",
      "",
      "Columns: Δ = arm − baseline, mean over seeds, valid loss in nats per character; [95% "
      "interval] from the paired per-seed differences (Student t, n−1 df) when both arms "
      "finished every seed, else Welch's; Δ params total (activated where it differs); Δ "
      "forward FLOPs per token († computed from the config's abstract model, the runs predate "
      "it in their summaries); Δ step time measured during the sweeps (two sweeps shared a "
      "2-core CPU: a rough guide); verdict: the report's word by the rule of "
      "research/verdict.py against the paper's claim (docs/architecture.md, \"Verdicts\"): "
      "Welch |t| ≥ 2 with every seed agreeing, a lower bar than a 95% interval clear of zero "
      "(with 3 seeds paired, t ≥ 4.30), so a reproduced row's interval may still reach across "
      "zero; "
      f"\"{NO_CLAIM}\" where the paper makes none for this comparison at this scale, "
      f"\"{SUPERSEDED}\" where the sweep marks the comparison unfair.", "",
      "![scoreboard](scoreboard.png)", ""]


def _table(rows: list[Row], ratio: bool) -> list[str]:
  head = ["#", "experiment", "arm (group)", "baseline", "shape", "baseline loss",
          "Δ loss [95%]", "seeds"]
  head += (["Δ FLOPs/token", "Δ loss per +10% FLOPs"] if ratio else
           ["Δ at its own setting", "Δ params", "Δ FLOPs/token", "Δ step time"])
  head += ["verdict", "vs the common setting"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for i, r in enumerate(rows, 1):
    cells = [str(i), r.experiment, _name(r), _baseline_cell(r), r.shape, f"{r.loss:.4f}",
             delta_cell(r.interval), r.seeds]
    if ratio:
      per = ("no extra FLOPs" if r.flops_frac <= FREE
             else signed(r.interval.delta / (10 * r.flops_frac)))
      cells += [_flops_cell(r), per]
    else:
      cells += [_own_cell(r), _params_cell(r), _flops_cell(r), _step_cell(r)]
    cells += [r.verdict, _setting_cell(r)]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def markdown(board: Board) -> str:
  lines = _header(board)
  lines += ["## Sorted by Δ loss", ""] + _table(by_loss(board.rows), ratio=False) + [""]
  lines += ["## Sorted by Δ loss per Δ FLOPs", "",
            "Rows with no extra forward compute (Δ FLOPs ≤ +0.1%) first, by Δ loss; then the "
            "rest by Δ loss per +10% forward FLOPs (the most loss bought per FLOP first). "
            "Rows without FLOPs are left out.", ""]
  lines += _table(by_loss_per_flops(board.rows), ratio=True) + [""]
  lines += _not_at_common(board.rows)
  pending = [r for r in board.rows if not r.measured]
  if pending:
    lines += ["## Declared, not yet measured", ""]
    lines += [f"- {r.experiment}: {_name(r)} against {r.baseline}, shape {r.shape}"
              + (f"; {_setting_cell(r)}" if not r.like_for_like else "") for r in pending]
    lines.append("")
  if board.without:
    lines += ["Experiments with results and no headline arm (no row): "
              + ", ".join(board.without) + ".", ""]
  if board.problems:
    lines += ["## Not shown: could not be read", ""] + [f"- {p}" for p in board.problems] + [""]
  return "\n".join(lines)


def _not_at_common(rows: list[Row]) -> list[str]:
  """The section listing every row not yet at the common setting, with its command and the
  runs it trains."""
  todo = [r for r in rows if r.todo is not None]
  if not todo:
    return []
  lines = ["## Not yet at the common setting", "",
           "Each row below is measured at the common setting by its experiment's "
           f"`{COMMON_GROUP}` group: the command, then the runs it trains (arms × seeds that no "
           "committed row reports with every seed; `--skip_reported` shows those rows instead "
           "of training them).", ""]
  for r in todo:
    t = r.todo
    what = f"- {r.experiment}: {_name(r)} against {r.baseline}: "
    if t.why:
      lines.append(what + f"its {COMMON_GROUP} group cannot be built: {t.why}")
      continue
    trains = (f"{t.runs} runs ({', '.join(t.train)} × {t.seeds} seeds)" if t.train
              else "0 runs (nothing to train: the report shows the rows named here)")
    reused = "; ".join(f"{a} is {src}'s row" for a, src in t.reused.items())
    sweep_cmd, report_cmd = t.commands
    lines.append(what + f"`{sweep_cmd}`, then `{report_cmd}`: {trains}"
                 + (f"; {reused}" if reused else "")
                 + (f"; its common group still differs in {', '.join(t.differs)} (what the "
                    "method needs: research/scoreboard.py `common_group`)" if t.differs else ""))
  total = sum(r.todo.runs for r in todo)
  distinct = _distinct([(c, r.todo.seeds) for r in todo for c in r.todo.configs])
  shared = (f", {distinct} when a config that several rows share trains once (run in one runs "
            "directory, a sweep reuses a finished run of the same config)" if distinct < total
            else "")
  lines += ["", f"In all {total} runs{shared}.", ""]
  return lines


def _distinct(configs: list[tuple[dict, int]]) -> int:
  """Runs of the configs (resolved, with their seeds), each config counted once
  (sweep.same_config: a sweep reuses a finished run of the same config)."""
  from research.sweep import same_config  # pylint: disable=import-outside-toplevel
  seen: list[dict] = []
  runs = 0
  for config, seeds in configs:
    if not any(same_config(other, config) for other in seen):
      seen.append(config)
      runs += seeds
  return runs


# ------------------------------------------------------------------------------------- plot

def plot(board: Board, out_png: Path) -> None:
  """Left: Δ loss with its 95% interval per row, sorted (filled: like-for-like; hollow: not),
  coloured by verdict. Right: Δ loss against Δ forward FLOPs (%)."""
  rows = by_loss(board.rows)
  fig = Figure(figsize=(13, max(4.0, 0.38 * len(rows) + 1.5)))
  left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
  for y, r in enumerate(rows):
    i = r.interval
    color = COLORS.get(r.verdict, "tab:blue")
    err = None if math.isnan(i.low) else [[i.delta - i.low], [i.high - i.delta]]
    face = color if r.like_for_like else "white"
    left.errorbar([i.delta], [y], xerr=err, fmt="o", color=color, markerfacecolor=face,
                  capsize=3)
    if r.flops_frac is not None:
      x = 100 * r.flops_frac
      right.plot([x], [i.delta], "o", color=color, markerfacecolor=face)
      left_of = abs(x) < 0.5  # the points at no extra FLOPs: labels to their left
      right.annotate(f"{r.experiment}/{r.arm}", (x, i.delta), fontsize=6, va="center",
                     ha="right" if left_of else "left", xytext=(-4 if left_of else 4, 0),
                     textcoords="offset points")
  left.set_yticks(range(len(rows)), [f"{r.experiment}: {r.arm}"
                                      + (f" ({COMMON_GROUP})" if r.at_common else "")
                                      for r in rows], fontsize=8)
  left.invert_yaxis()
  left.axvline(0, color="black", linewidth=0.6)
  right.axhline(0, color="black", linewidth=0.6)
  right.axvline(0, color="black", linewidth=0.6)
  for ax in (left, right):
    ax.grid(alpha=0.3)
  left.set_xlabel("Δ valid loss vs its baseline (nats), 95% interval")
  left.set_title("headline arms (filled: like-for-like with the common setting)", fontsize=9)
  right.set_xlabel("Δ forward FLOPs per token (%)")
  right.set_ylabel("Δ valid loss (nats; intervals on the left)")
  right.set_title("loss against compute", fontsize=9)
  handles = [left.plot([], [], "o", color=c, label=w)[0] for w, c in COLORS.items()]
  handles.append(left.plot([], [], "o", color="tab:blue", label="no claim, other")[0])
  left.legend(handles=handles, fontsize=7, loc="upper right")
  fig.suptitle(f"Scoreboard ({board.date}): research scoreboard")
  fig.tight_layout()
  fig.savefig(out_png, dpi=110)


def write(board: Board | None = None, out_dir: str | Path | None = None) -> tuple[Path, Path]:
  """Writes SCOREBOARD.md and scoreboard.png (default: into the experiments directory)."""
  board = board or build()
  out = Path(out_dir) if out_dir else experiments.experiments_dir()
  out.mkdir(parents=True, exist_ok=True)
  md, png = out / "SCOREBOARD.md", out / "scoreboard.png"
  md.write_text(markdown(board))
  plot(board, png)
  return md, png
