"""E2 ``specialization``: the analog of Fig. 9 — relative expert load per domain, aux-loss vs aux-loss-free model.

Reuses E1's runs (the run cache); nothing is retrained. Paper: DeepSeek-V3 §4.5.3, Fig. 9, Appendix C.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd

from ..train.metrics import specialization_score
from ..viz.training import plot_domain_load
from . import Context, Result, experiment
from ._common import VARIANTS, compare, fmt, mean_std, variant_runs


@experiment("specialization", "E2: relative expert load per domain (Fig. 9 analog) and a specialization score")
def run(ctx: Context) -> Result:
    runs = variant_runs(ctx)  # E1's runs, from the run cache
    rows, finals = [], {}
    for (variant, seed), r in runs.items():
        el = r.expert_load
        final = el[el.step == el.step.max()]
        finals[(variant, seed)] = final
        rows.append({"variant": variant, "seed": seed, "score": specialization_score(final)})
    table = pd.DataFrame(rows)
    table.to_csv(ctx.out / "specialization.csv", index=False)
    pd.concat([f.assign(variant=v, seed=s) for (v, s), f in finals.items()]).to_csv(
        ctx.out / "specialization_loads.csv", index=False
    )

    seed0 = ctx.seeds[0]
    layers = sorted(finals[("aux_free", seed0)].layer.unique())
    shown = [layers[0], layers[-1]]
    fig, axes = plt.subplots(2, 2, figsize=(13, 4.6))
    for r, variant in enumerate(("aux_loss", "aux_free")):
        for j, layer in enumerate(shown):
            plot_domain_load(finals[(variant, seed0)], layer, ax=axes[r, j], title=f"{variant} — MoE layer {layer}")
    fig.suptitle(f"relative expert load per validation domain (seed {seed0}; 1 = balanced)", fontsize=10)
    fig.tight_layout()
    fig.savefig(ctx.out / "specialization.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    by = {v: table[table.variant == v].score for v in VARIANTS}
    cmp = compare(by["aux_loss"], by["aux_free"])
    above = "above" if by["aux_free"].mean() > by["aux_loss"].mean() else "not above"
    verdict = {
        "lower": (
            "**reproduced**: the aux-loss-free model's experts specialise more by domain than the aux-loss model's"
        ),
        "within noise": "**not resolved at toy scale**: the scores differ by less than two standard errors over seeds",
        "one seed": f"one seed (`--fast`): aux-loss-free {above} aux-loss; no verdict",
        "higher": "**not reproduced at toy scale**: the aux-loss model specialises more",
    }[cmp]
    table_rows = "\n".join(f"| `{v}` | {fmt(by[v])} |" for v in VARIANTS)
    report = f"""## E2 — Expert specialization by domain (Fig. 9 analog)

**Paper** (§4.5.3, Fig. 9): batch-wise balancing (the auxiliary-loss-free bias) leaves room for experts to specialise
by domain, which a sequence-wise or expert-level auxiliary loss suppresses; on the Pile test set the aux-loss-free 16B
model shows a more uneven relative load across Wikipedia, GitHub and DM Mathematics.

**Measured** on E1's final models (no retraining), from the routing of the validation rows of each domain (code =
Python standard-library sources, prose = Python documentation, math = generated arithmetic problems). Relative load =
tokens an expert receives / (tokens × K / N) for that domain. **Specialization score** = the standard deviation across
the three domains of an expert's relative load, averaged over the MoE layers and experts (0 = no domain preference).
Figure: layers {shown[0]} and {shown[1]} (first and last MoE layer), seed {seed0}.

| variant | specialization score |
|---|---:|
{table_rows}

**Verdict:** {verdict} (aux_free {fmt(by["aux_free"])} vs aux_loss {fmt(by["aux_loss"])}).

![relative expert load per domain](specialization.png)
"""
    summary = {"specialization": {v: {"score": mean_std(by[v])[0], "score_std": mean_std(by[v])[1]} for v in VARIANTS}}
    return Result(report, summary, ["specialization.csv", "specialization_loads.csv", "specialization.png"])
