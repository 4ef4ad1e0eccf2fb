"""The learned connection matrices of hyper-, frac- and virtual-width connections, as heat maps.

  extract(model)       each sublayer's static connection matrix [[0, B], [A_read, A_carry]]
                       (research/model/residual.py) and the unfolded map below; None for a
                       model whose residual option has no matrices (plain)
  write(model, dir)    connections.json + connections.png in a run directory (`at_end`: the
                       evaluator `connections`, run at the end of a run)
  from_checkpoint(dir) the trained model of a run directory, from its latest checkpoint
  report_section(...)  one heat map per arm of a sweep (mean over finished seeds), for
                       `research report` (called from the experiments' analysis.py)

The unfolded map is the HC paper's unfolded-connection view (where it finds a "Lambda-shaped"
pattern) of the static weights: how strongly the input of each sublayer (rows; the last row is
the model's output) depends on the embedding and on each earlier sublayer's output (columns),
obtained by running the static weights through the depth recursion on coefficient matrices
instead of activations. Where a source and a reader are a
single segment (hyper: one stream vector) the entry is the signed coefficient; otherwise (frac,
vwn: several segments of D/m) it is the Frobenius norm of the block of coefficients. Dynamic
weights vary per token and are not included.

    python -m research.eval.connections RUN_DIR [RUN_DIR ...]   # from checkpoints
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # drawn off-screen, as in research/report.py

SUBLAYERS = ("attn", "channel")


def extract(model) -> dict | None:
  """{"kind", "matrices": [2L] x (m+S) x (m+S), "labels", "unfolded", "sources"} or None."""
  conns = [c for b in model.blocks for c in (b.attn_residual, b.channel_residual)]
  mats = [c.matrix() for c in conns]
  if any(m is None for m in mats):
    return None
  c0 = conns[0]
  kind = model.cfg.residual.kind
  s, m = c0.slots, c0.segments
  start = np.ones((s, 1)) if kind == "hyper" else np.eye(s)  # the embedding in the slots
  labels = [f"{i // 2}.{SUBLAYERS[i % 2]}" for i in range(len(conns))]
  unfolded = unfold([np.asarray(x, np.float64) for x in mats], m, start)
  return {"kind": kind, "slots": s, "segments": m, "labels": labels,
          "matrices": [np.asarray(x).tolist() for x in mats], "unfolded": unfolded.tolist(),
          "sources": ["embed"] + labels, "rows": labels + ["output"]}


def unfold(mats: list[np.ndarray], m: int, start: np.ndarray) -> np.ndarray:
  """[2L + 1, 2L + 1]: dependence of each sublayer input (and the output) on the embedding and
  on each sublayer's output, from the static matrices (see the module docstring)."""
  s, e = start.shape
  coef = start  # [S slots, source segments]: what each slot holds
  groups = [range(0, e)]  # source -> its segment columns
  rows = []

  def summarize(block_rows: np.ndarray) -> list[float]:
    out = []
    for g in groups:
      blk = block_rows[:, list(g)]
      out.append(float(blk[0, 0]) if blk.size == 1 else float(np.linalg.norm(blk)))
    return out

  for mat in mats:
    b, alpha = mat[:m, m:], mat[m:, :]  # B [m, S]; [A_read | A_carry] [S, m+S]
    rows.append(summarize(alpha[:, :m].T @ coef))  # sublayer input = A_read^T H
    coef = alpha[:, m:].T @ coef  # carry
    coef = np.concatenate([coef, b.T], axis=1)  # write: new source segments
    groups.append(range(coef.shape[1] - m, coef.shape[1]))
  out_row = coef.sum(axis=0, keepdims=True) if start.shape[1] == 1 else coef  # hyper: sum
  rows.append(summarize(out_row))
  width = len(groups)
  return np.asarray([r + [0.0] * (width - len(r)) for r in rows])


def plot(data: dict, out_png: str | Path, title: str = "") -> Path:
  """Left: the unfolded map; right: each sublayer's static matrix (shared diverging scale)."""
  mats = [np.asarray(x) for x in data["matrices"]]
  unfolded = np.asarray(data["unfolded"])
  n = len(mats)
  cols = min(8, n)
  grid_rows = math.ceil(n / cols)
  fig = Figure(figsize=(6 + 1.6 * cols, max(5.0, 1.7 * grid_rows + 1)))
  left, right = fig.subfigures(1, 2, width_ratios=(5, 1.5 * cols))
  ax = left.subplots()
  vmax = float(np.max(np.abs(unfolded))) or 1.0
  signed = bool(np.min(unfolded) < 0)
  im = ax.imshow(unfolded, cmap="RdBu_r" if signed else "viridis",
                 vmin=-vmax if signed else 0.0, vmax=vmax)
  ax.set_xticks(range(len(data["sources"])), data["sources"], rotation=90, fontsize=6)
  ax.set_yticks(range(len(data["rows"])), data["rows"], fontsize=6)
  ax.set_xlabel("source (embedding, sublayer outputs)")
  ax.set_ylabel("reader (sublayer inputs, model output)")
  ax.set_title("unfolded static connections", fontsize=9)
  left.colorbar(im, ax=ax, shrink=0.7)
  vmax = max(float(np.max(np.abs(x))) for x in mats) or 1.0
  axes = np.atleast_1d(right.subplots(grid_rows, cols)).reshape(-1)
  for i, a in enumerate(axes):
    a.set_xticks([])
    a.set_yticks([])
    if i >= n:
      a.axis("off")
      continue
    im = a.imshow(mats[i], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    a.set_title(data["labels"][i], fontsize=7)
  right.colorbar(im, ax=list(axes), shrink=0.6)
  right.suptitle("static matrix per sublayer: [[0, B], [A_read, A_carry]]", fontsize=9)
  left.suptitle(title or f"{data['kind']} connections", fontsize=10)
  out_png = Path(out_png)
  fig.savefig(out_png, dpi=100)
  return out_png


def write(model, workdir: str | Path, title: str = "") -> Path | None:
  """Writes connections.json and connections.png into `workdir`; None (nothing written) for a
  residual option without connection matrices."""
  data = extract(model)
  if data is None:
    return None
  workdir = Path(workdir)
  (workdir / "connections.json").write_text(json.dumps(data))
  return plot(data, workdir / "connections.png", title)


WHEN = "at_end"  # an evaluator (research/eval/__init__.py)


def at_end(model, *, tokens, workdir, title: str, primary: bool) -> dict:
  """Writes the heat maps of a model whose residual option has connection matrices."""
  del tokens
  if primary:
    write(model, workdir, title=title)
  return {}


def from_checkpoint(workdir: str | Path):
  """The model of a run directory with the parameters of its latest checkpoint."""
  from research.infer import load_run  # pylint: disable=import-outside-toplevel
  return load_run(workdir).model


def report_section(experiment: str, runs_root: str | Path, groups: list[str],
                   out_dir: str | Path) -> str:
  """Markdown with one heat map per arm (mean over the finished seeds that wrote
  connections.json) of the sweep `groups` of `experiment` under `runs_root`."""
  from research import report as report_lib  # pylint: disable=import-outside-toplevel
  runs_root, out_dir = Path(runs_root), Path(out_dir)
  lines = []
  for group in groups:
    manifest_path = runs_root / group / "manifest.json"
    if not manifest_path.is_file():  # a group carried over from an earlier report: its maps
      longer = tuple(f"{g}_" for g in groups if g != group and g.startswith(f"{group}_"))
      lines += [f"![{group} {png.name[len(group) + 1:-len('_connections.png')]} connections]"
                f"({png.name})\n" for png in sorted(out_dir.glob(f"{group}_*_connections.png"))
                if not (longer and png.name.startswith(longer))]
      continue
    _, arms = report_lib._load_sweep(manifest_path)  # pylint: disable=protected-access
    for arm in arms:
      found = [json.loads((r.workdir / "connections.json").read_text()) for r in arm.finished
               if (r.workdir / "connections.json").is_file()]
      name = f"{group}_{arm.name}_connections.png".replace("/", "_")
      if not found:
        if (out_dir / name).is_file():  # drawn by an earlier report from runs not here
          lines.append(f"![{group} {arm.name} connections]({name})\n")
        continue
      mean = dict(found[0])
      for key in ("matrices", "unfolded"):
        mean[key] = np.mean([np.asarray(d[key]) for d in found], axis=0).tolist()
      title = f"{experiment} / {group} / {arm.name} (mean of {len(found)} seeds)"
      plot(mean, out_dir / name, title)
      lines.append(f"![{group} {arm.name} connections]({name})\n")
  if not lines:
    return ""
  return "## Learned connection matrices\n\n" + "\n".join(lines)


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__.strip().splitlines()[-1].strip())
    return 2
  for workdir in argv:
    path = write(from_checkpoint(workdir), workdir, title=str(workdir))
    print(f"{workdir}: {path or 'no connection matrices (plain residual)'}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
