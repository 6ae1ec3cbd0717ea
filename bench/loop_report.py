"""The closed loop's report: `<stem>.json` (everything), `<stem>.md` (the tables) and
`<stem>.png` (rates per task: random, v1, v2, oracle; AUCs: v1, v2, oracle)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.report import save_figure, write_files

TASKS = ("click", "like", "share")


def _f(x: float | None, d: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def _v2_data(f: dict[str, Any]) -> str:
    """What v2 was trained on, and from which weights."""
    if "with_data" in f:
        d = f["with_data"]
        what = (f"log of v1's training traffic **plus v1's own offline training data** "
                f"(`--with-data`: {d['rows']['train']} train and {d['rows']['val']} validation "
                "rows of the world's offline log, encoded with v1's schema)")
    else:
        what = "log of v1's training traffic only"
    if "init_from" in f:
        what += (", **warm-started from v1's weights** (`--init-from`: "
                 f"`{f['init_from']['checkpoint']}`)")
    return what


def markdown(r: dict[str, Any]) -> str:
    cfg, on, held = r["config"], r["online"], r["heldout_auc"]
    v1, v2 = r["versions"]["v1"], r["versions"]["v2"]
    train = r["simulate"]["train"]
    j = r["from_logs"]["counts"]
    lines = [
        f"# The closed loop, measured ({'small' if cfg['small'] else 'default'} world)",
        "",
        "`python -m bench.loop " + " ".join(r.get("argv", [])) + "`: one `ranker serve` worker, "
        "the served log at 100 %, a real redis-server, all on loopback. v1 is the main job's "
        "model (trained on the world's offline log); v2 is `ranker train --from-logs` on the "
        + _v2_data(r["from_logs"])
        + ", then `ranker export` and `POST /admin/reload`.",
        "",
        f"- training traffic: {train['answered']} requests, **{train['impressions']} impressions**"
        f" ({cfg['candidates']} candidates, top {cfg['top_k']}), "
        f"{sum(train['events'].values())} events in {train['run']['elapsed_s']:.0f} s; "
        f"v2 trained on {j['impressions']} joined impressions (split by time: "
        f"{r['v2_rows']['train']} train, {r['v2_rows']['val']} validation, "
        f"{r['v2_rows']['test']} test), labels {j['labels']}, late {j['late']}, orphan "
        f"{j['orphan']}, duplicate {j['duplicate']}",
        *([f"- exploration: the training traffic's server explored "
           f"(`RANKER_EXPLORE_RATE={cfg['explore_rate']:g}`: "
           f"{r.get('explored_requests', 0):.0f} requests served {cfg['top_k']} candidates "
           "drawn uniformly, propensities logged); v2 trained on inverse-propensity resampled "
           f"splits (`--ips-clip {cfg['ips_clip']:g}`: "
           f"{_ips(r['from_logs'].get('ips', {}))}); the evaluation server does not explore"]
          if cfg.get("explore_rate") else []),
        f"- evaluation: seeds {cfg['seed'] + 1}..{cfg['seed'] + cfg['eval_seeds']}, "
        f"{cfg['eval_requests']} requests each, the **same requests** (users, candidates, "
        f"contexts, and the users' random draws) under v{v1} and under v{v2}: "
        f"{on['v1']['impressions']} impressions per version",
        f"- checks: {sum(c['ok'] for c in r['checks'])} of {len(r['checks'])} passed"
        + ("" if r["ok"] else " (**some failed**, see the JSON)"),
        "",
        "## AUC on held-out logged impressions",
        "",
        f"The test split of v2's training log (the latest 10 % of requests, {held['rows']} "
        "impressions, never trained on); labels are what the simulated users did (so they "
        "carry the position effect: an item shown low is examined less). v1's AUC is its "
        "logged scores (v1 served these impressions); the oracle's is `World.probabilities`.",
        "",
        "| task | positives | v2 AUC | v1 AUC | oracle AUC |",
        "|---|---|---|---|---|",
    ]
    for t in TASKS:
        h = held["per_task"][t]
        lines.append(f"| {t} | {h['positives']} | {_f(h['v2_auc'])} | {_f(h['v1_auc'])} | "
                     f"{_f(h['oracle_auc'])} |")
    lines += ["", "On the evaluation traffic (each version on the impressions it served itself):",
              "", "| task | v1 AUC | oracle on v1's | v2 AUC | oracle on v2's |",
              "|---|---|---|---|---|"]
    ea = r["eval_auc"]
    for t in TASKS:
        a, b = ea[f"v{v1}"][t], ea[f"v{v2}"][t]
        lines.append(f"| {t} | {_f(a['served_model_auc'])} | {_f(a['oracle_auc'])} | "
                     f"{_f(b['served_model_auc'])} | {_f(b['oracle_auc'])} |")
    lines += ["", "## Online rates (events per impression)", "",
              "Measured under each version, and the expected rates of the served, the oracle's "
              "(the candidates sorted by their true combined score: the best any ranking can do) "
              "and a random ranking of the same candidates, from the simulator's summaries. "
              "*closeness* = (rate - random) / (oracle - random): 0 is random, 1 the oracle.", "",
              "| task | random | v1 measured | v1 expected | v2 measured | v2 expected | oracle "
              "| closeness v1 | closeness v2 |",
              "|---|---|---|---|---|---|---|---|---|"]
    for k in (*TASKS, "weighted"):
        a, b = on["v1"], on["v2"]
        ma = a["rates"][k] if k != "weighted" else a["measured_weighted"]
        mb = b["rates"][k] if k != "weighted" else b["measured_weighted"]
        lines.append(
            f"| {k} | {_f(a['expected']['random'][k])} | {_f(ma)} | "
            f"{_f(a['expected']['served'][k])} | {_f(mb)} | {_f(b['expected']['served'][k])} | "
            f"{_f(a['expected']['oracle'][k])} | "
            f"{_f(on['closeness']['v1'][k]['expected'], 3)} | "
            f"{_f(on['closeness']['v2'][k]['expected'], 3)} |")
    lines += ["", "(weighted: click + like + share, the server's default weights 1, 1, 1; the "
              "closeness columns use the expected rates, which have no draw noise.)", "",
              "## v2 against v1: the noise", "",
              "| task | events v1 | events v2 | v2 - v1 | sd | z | expected rate v2 - v1 "
              "(paired over seeds, 95 % CI) |", "|---|---|---|---|---|---|---|"]
    cmp_ = on["comparison"]
    for t in TASKS:
        c = cmp_[t]
        e = c["expected_served_diff"]
        lines.append(f"| {t} | {c['events_v1']} | {c['events_v2']} | {c['difference']:+d} | "
                     f"{c['sd']:.1f} | {c['z']:+.2f} | {e['mean']:+.5f} "
                     f"[{_f(e['ci95'][0], 5)}, {_f(e['ci95'][1], 5)}] |")
    e = cmp_["weighted"]["expected_served_diff"]
    lines.append(f"| weighted | | | | | | {e['mean']:+.5f} [{_f(e['ci95'][0], 5)}, "
                 f"{_f(e['ci95'][1], 5)}] |")
    lines += ["", "sd: the simulator's standard deviation of each run's event count "
              "(`expected_events_sd`), combined for the difference of the two runs. The paired "
              "interval is over the evaluation seeds: the same requests under both versions, so "
              "only the rankings differ.", "", "## Timings (s)", "",
              ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()), ""]
    if r.get("verdict"):
        lines += ["## Verdict", "", r["verdict"], ""]
    return "\n".join(lines)


def _ips(ips: dict[str, Any]) -> str:
    if not ips.get("applied"):
        return "not applied"
    return (f"propensities from {ips['propensity_min']:.3g}, median "
            f"{ips['propensity_median']:.3g}, {ips['clipped_share']:.1%} clipped, effective "
            f"rows {ips['effective_rows']:.0f}, distinct rows drawn "
            f"{ips['distinct_rows_drawn']:.0f}")


def plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    on, held = r["online"], r["heldout_auc"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    keys = (*TASKS, "weighted")
    width = 0.2
    bars = [("random", on["v1"]["expected"]["random"], "tab:gray"),
            ("v1 (expected)", on["v1"]["expected"]["served"], "tab:blue"),
            ("v2 (expected)", on["v2"]["expected"]["served"], "tab:orange"),
            ("oracle", on["v1"]["expected"]["oracle"], "tab:green")]
    for i, (label, vals, color) in enumerate(bars):
        ax1.bar([x + (i - 1.5) * width for x in range(len(keys))], [vals[k] for k in keys],
                width, label=label, color=color)
    for i, ver in ((1, "v1"), (2, "v2")):
        meas = [on[ver]["rates"][t] for t in TASKS] + [on[ver]["measured_weighted"]]
        sd = [on[ver]["events_sd"][t] / on[ver]["impressions"] for t in TASKS] + [0.0]
        ax1.errorbar([x + (i - 1.5) * width for x in range(len(keys))], meas,
                     yerr=[2 * s for s in sd], fmt="k.", ms=4,
                     label="measured ± 2 sd" if i == 1 else None)
    ax1.set_xticks(range(len(keys)), keys)
    ax1.set_yscale("log")
    ax1.set_ylim(top=1.5)  # room for the legend above the bars
    ax1.set_ylabel("events per impression")
    ax1.set_title("online rates on the same requests")
    ax1.legend(fontsize=7, ncol=3, loc="upper center")
    aucs = [("v1", "v1_auc", "tab:blue"), ("v2", "v2_auc", "tab:orange"),
            ("oracle", "oracle_auc", "tab:green")]
    for i, (label, key, color) in enumerate(aucs):
        ax2.bar([x + (i - 1) * 0.25 for x in range(len(TASKS))],
                [held["per_task"][t][key] for t in TASKS], 0.25, label=label, color=color)
    ax2.set_xticks(range(len(TASKS)), TASKS)
    ax2.set_ylim(0.5, 1.0)
    ax2.set_ylabel("AUC")
    ax2.set_title(f"held-out logged impressions ({held['rows']})")
    ax2.legend(fontsize=8)
    save_figure(fig, path)


def write_report(result: dict[str, Any], out: Path, stem: str) -> list[Path]:
    return write_files(result, out, stem, markdown=markdown, plot=plot)
