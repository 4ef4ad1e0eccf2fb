"""The Over-Tokenized Transformer's tables at the tiny character-level scale (the digest's plan):

  research sweep over_tokenized --group scaling          # baseline and OE at m = 1k .. 262k
  research sweep over_tokenized --group ablation         # Table 3 / Table 2 analogues
  research sweep over_tokenized --group hash_conflicts   # Table 4 analogue
  research sweep over_tokenized --group output           # Tables 5 and 10 analogues
  research report over_tokenized                         # + the fit of loss against log10 m

scaling: the reference is the baseline (the plain embedding); every OE arm (orders 2, 3; k = 2)
claims a lower loss, and analysis.py fits loss = a + b log10 m over the OE arms' seeds (the
paper: b = -0.0256 on training loss, OLMoE-1.3B, 500B tokens). ablation: against the baseline;
the paper's orders say 1+2+3 < 1+2 < baseline < 2-gram without the token's own row, and
slicing helps. hash_conflicts: one 2-gram table of 16 V = 1,040 rows (the 2-gram id mod 16 V
keeps only the previous token mod 16) against 1,039 rows (coprime with 65): the multiple
claims a higher loss. output: against the baseline; OD and MTP alone claim nothing better
("same"), OE + MTP (OT) a lower loss.
"""

from research.experiments import Arm, Headline, Sweep

ARG = "scale=tiny,corpus=tinyshakespeare"
OE = "model.embed.over_encoding."
PLAIN = {"model.embed.kind": "plain"}
SCALING_ROWS = (1021, 4093, 16381, 65521, 262139)  # primes: coprime with V = 65


def oe(rows=16381, **settings):
  return {OE + "rows": rows, **{OE + k: v for k, v in settings.items()}}


def get_sweep() -> Sweep:
  scaling = [Arm("baseline", dict(PLAIN))]
  scaling += [Arm(f"oe_{m}", oe(m), claim="lower") for m in SCALING_ROWS]
  ablation = [Arm("baseline", dict(PLAIN)),
              Arm("oe_16381", oe(), claim="lower"),                 # 1 + 2 + 3, k = 2
              Arm("oe_1_2", oe(grams="2"), claim="lower"),          # Table 3: 1 + 2
              Arm("oe_1_3", oe(grams="3"), claim="lower"),          # Table 3: 1 + 3
              Arm("oe_2_only", oe(grams="2", unigram=False), claim="higher"),  # no 1-gram row
              Arm("oe_k1", oe(slices=1), claim="lower"),            # Table 2: slicing
              Arm("oe_k4", oe(slices=4), claim="lower"),
              Arm("oe_exact", oe(exact=True, slices=1), claim="lower")]  # no hashing at all
  conflicts = [Arm("coprime_1039", oe(1039, grams="2", slices=1)),
               Arm("multiple_1040", oe(1040, grams="2", slices=1), claim="higher"),
               Arm("baseline", dict(PLAIN))]
  output = [Arm("baseline", dict(PLAIN)),
            Arm("od_0.1", {**PLAIN, "model.head.kind": "over_decoding",
                           "model.head.od_weights": "0.1"}, claim="same"),
            Arm("od_0.5", {**PLAIN, "model.head.kind": "over_decoding",
                           "model.head.od_weights": "0.5"}, claim="same"),
            Arm("mtp_0.1", {**PLAIN, "model.head.kind": "mtp", "model.head.mtp_weight": 0.1},
                claim="same"),
            Arm("oe_16381", oe(), claim="lower"),
            Arm("ot_16381", {**oe(), "model.head.kind": "mtp", "model.head.mtp_weight": 0.1},
                claim="lower")]
  return Sweep(groups={"scaling": scaling, "ablation": ablation, "hash_conflicts": conflicts,
                       "output": output},
               arg=ARG, seeds=3, default_group="scaling",
               headline=(Headline("scaling", "oe_16381"),))
