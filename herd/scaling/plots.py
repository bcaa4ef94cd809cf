"""PNG figures of a scaling fit: isoFLOP profiles and optimal-allocation laws, the parametric law, the downstream
chain, and a prediction's extrapolation. Log axes where the quantity spans orders of magnitude; fitted curves drawn
over the points; intervals shaded."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from herd.errors import UserError
from herd.scaling.laws import Points, budgets_of, parametric_loss
from herd.scaling.predict import sigmoid_accuracy


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("the scaling plots need matplotlib (pip install 'herd[scaling]')") from None
    return plt


def _save(plt, fig, axes, path: str | Path) -> Path:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":  # labels at 1, 2, 5 x 10^k; 1, 1.5, 2, 3, 5, 7 x 10^k on axes spanning under a decade
                lo, hi = sorted(axis.get_view_interval())
                narrow = lo > 0 and hi / lo < 10
                axis.set_major_locator(LogLocator(subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0) if narrow else (1.0, 2.0, 5.0)))
                axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
                axis.set_minor_formatter(NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _band(ax, x: np.ndarray, draws: list | None, color) -> None:
    """Shade the 95% range of k x^s over a power law's bootstrap draws [ln k, s]."""
    if not draws:
        return
    d = np.array(draws)
    curves = np.exp(d[:, :1] + d[:, 1:] * np.log(x)[None, :])
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, linewidth=0, label="95% bootstrap band")


def plot_isoflop(points: Points, iso: dict, path: Path) -> Path:
    plt = _pyplot()
    groups = budgets_of(points)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    for axis, ax in (("N", axes[0]), ("D", axes[1])):
        values = points.N if axis == "N" else points.D
        for (b, idx), color, rec in zip(groups, colors, iso["budgets"]):
            lo, hi = values[idx].min() / 1.3, values[idx].max() * 1.3
            opt = rec[f"{axis}_opt"]
            shown = opt is not None and lo <= opt <= hi  # a vertex far outside the sizes would only squash the plot
            ax.scatter(values[idx], points.loss[idx], color=color, zorder=3,
                       label=f"C = {b:.2g} FLOPs" + ("" if shown else " (no minimum inside the sizes)"))
            xs = np.geomspace(lo, hi, 100)
            ax.plot(xs, np.polyval(rec[f"parabola_ln{axis}"], np.log(xs)), color=color, linewidth=1)
            if shown:
                ax.plot(opt, rec[f"loss_at_{axis}_opt"], marker="*", markersize=14, color=color,
                        markeredgecolor="black", zorder=4)
        ax.set_xscale("log")
        what = "parameters N" if axis == "N" else "training tokens D"
        ax.set(xlabel=f"{what} (log scale)", ylabel="validation loss (nats/token)",
               title=f"isoFLOP profiles: parabola in ln {axis}, minimum starred")
        ax.legend(fontsize=8)
    ax = axes[2]
    budgets = np.array([b for b, _ in groups])
    cs = np.geomspace(budgets.min() / 2, budgets.max() * 2, 100)
    for axis, color, marker in (("N", "tab:blue", "o"), ("D", "tab:orange", "s")):
        law = iso[f"{axis}_opt"]
        values = points.N if axis == "N" else points.D
        opt = np.array([r[f"{axis}_opt"] or np.nan for r in iso["budgets"]])
        inside = np.array([values[idx].min() <= o <= values[idx].max() for o, (_, idx) in zip(opt, groups)])
        ax.scatter(budgets[inside], opt[inside], color=color, marker=marker, zorder=3, label=f"{axis}* per budget")
        if (~inside).any():
            ax.scatter(budgets[~inside], np.clip(opt[~inside], values.min() / 3, values.max() * 3), marker=marker,
                       facecolors="none", edgecolors=color, zorder=3, label=f"{axis}* outside the sizes (clipped)")
        if law.get("ill_conditioned"):
            ax.plot([], [], " ", label=f"{axis}*(C): not determined (see fit.json warnings)")
        elif math.isfinite(law["coefficient"]):
            ci = law.get("ci") or {}
            span = f" ({ci['exponent'][0]:.2f}, {ci['exponent'][1]:.2f})" if ci else ""
            ax.plot(cs, law["coefficient"] * cs ** law["exponent"], color=color,
                    label=f"{axis}*(C) = {law['coefficient']:.3g} C^{law['exponent']:.3f}{span}")
            _band(ax, cs, law.get("bootstrap_ln_coefficient_exponent"), color)
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs, log scale)",
           ylabel="compute-optimal N* (parameters) / D* (tokens)", title="optimal allocation (95% bootstrap CI)")
    ax.legend(fontsize=8)
    return _save(plt, fig, axes, path)


def plot_parametric(points: Points, par: dict, path: Path) -> Path:
    plt = _pyplot()
    groups = budgets_of(points)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(groups)))
    ax = axes[0]
    for (b, idx), color in zip(groups, colors):
        ax.scatter(points.N[idx], points.loss[idx], color=color, zorder=3, label=f"C = {b:.2g} FLOPs")
        # Along an isoFLOP line D = C / (k N), with this budget's own FLOPs per parameter-token k (6 plus attention).
        k = float(np.median(points.C[idx] / (points.N[idx] * points.D[idx])))
        ns = np.geomspace(points.N[idx].min() / 1.5, points.N[idx].max() * 1.5, 100)
        ax.plot(ns, parametric_loss(par, ns, b / (k * ns)), color=color, linewidth=1)
    ax.set(xscale="log", xlabel="parameters N (log scale)", ylabel="validation loss (nats/token)",
           title=(f"L(N, D) = {par['E']:.3g} + {par['A']:.3g}/N^{par['alpha']:.3f} + {par['B']:.3g}/D^"
                  f"{par['beta']:.3f}"))
    ax.legend(fontsize=8)
    ax = axes[1]
    predicted = parametric_loss(par, points.N, points.D)
    ax.scatter(points.loss, predicted, color="tab:blue", zorder=3)
    lims = [min(points.loss.min(), predicted.min()), max(points.loss.max(), predicted.max())]
    ax.plot(lims, lims, color="gray", linestyle="--", label="y = x")
    verdict = "ILL-CONDITIONED" if par.get("ill_conditioned") else "well determined"
    ax.set(xlabel="observed loss (nats/token)", ylabel="fitted L(N, D) (nats/token)",
           title=f"Approach 3 fit, rms log residual {par['rms_log_residual']:.4f} ({verdict})")
    ax.legend(fontsize=8)
    return _save(plt, fig, axes, path)


def plot_downstream(points: Points, downstream: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, axes = plt.subplots(len(downstream), 2, figsize=(12, 4.6 * len(downstream)), squeeze=False)
    for row, (name, fit) in enumerate(downstream.items()):
        task = points.tasks[name]
        s1, s2 = fit["nll_vs_compute"], fit["accuracy_vs_nll"]
        ax = axes[row, 0]
        ax.scatter(points.C, task["nll"], color="lightgray", zorder=2, label="every model")
        front = np.array(s1["points"])
        ax.scatter(front[:, 0], front[:, 1], color="tab:blue", zorder=3, label="best model per budget")
        cs = np.geomspace(front[:, 0].min() / 2, front[:, 0].max() * 2, 100)
        ax.plot(cs, s1["coefficient"] * cs ** s1["exponent"], color="tab:blue",
                label=f"NLL = {s1['coefficient']:.3g} C^{s1['exponent']:.3f}")
        _band(ax, cs, s1.get("bootstrap_ln_coefficient_exponent"), "tab:blue")
        ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs, log scale)",
               ylabel="NLL of the correct answer (nats/char)", title=f"{name}: stage 1, NLL vs compute")
        ax.legend(fontsize=8)
        ax = axes[row, 1]
        ax.scatter(task["nll"], task["acc"], color="tab:green", zorder=3, label="every model")
        xs = np.linspace(task["nll"].min() * 0.8, task["nll"].max() * 1.2, 200)
        ax.plot(xs, sigmoid_accuracy(xs, s2["lo"], s2["slope"], s2["mid"]), color="tab:green",
                label=f"sigmoid: floor {s2['lo']:.2f}, midpoint {s2['mid']:.3g}")
        if s2.get("bootstrap"):
            d = np.array(s2["bootstrap"])
            curves = sigmoid_accuracy(xs[None, :], d[:, :1], d[:, 1:2], d[:, 2:3])
            lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
            ax.fill_between(xs, lo, hi, color="tab:green", alpha=0.2, linewidth=0, label="95% bootstrap band")
        ax.set(xlabel="NLL of the correct answer (nats/char)", ylabel="accuracy (fraction correct)",
               ylim=(0, 1), title=f"{name}: stage 2, accuracy vs NLL")
        ax.legend(fontsize=8)
    return _save(plt, fig, axes.flat, path)


def plot_prediction(fit: dict, prediction: dict, path: str | Path) -> Path:
    """The D*(C) and N*(C) laws from their fitted range out to the predicted budget, the prediction with its
    interval; and the chained accuracy per task."""
    plt = _pyplot()
    C = prediction["C"]
    tasks = prediction.get("tasks", {})
    fig, axes = plt.subplots(1, 1 + bool(tasks), figsize=(6.5 * (1 + bool(tasks)), 4.8), squeeze=False)
    ax = axes[0, 0]
    budgets = [b["C"] for b in fit.get("isoflop", {}).get("budgets", [])]
    lo_c = min(budgets) if budgets else C / 1e4
    cs = np.geomspace(min(lo_c, C) / 2, C * 2, 200)
    for axis, color in (("N", "tab:blue"), ("D", "tab:orange")):
        if f"{axis}_opt" not in prediction:
            continue
        law = fit.get("isoflop", {}).get(f"{axis}_opt")
        if law and math.isfinite(law.get("coefficient", math.nan)):
            ax.plot(cs, law["coefficient"] * cs ** law["exponent"], color=color, label=f"{axis}*(C) law")
            _band(ax, cs, law.get("bootstrap_ln_coefficient_exponent"), color)
        ci = prediction.get(f"{axis}_opt_ci")
        value = prediction[f"{axis}_opt"]
        yerr = [[value - ci[0]], [ci[1] - value]] if ci else None
        ax.errorbar([C], [value], yerr=yerr, fmt="o", color=color, capsize=6, markeredgecolor="black",
                    label=f"{axis}* at {C:.3g}: {value:.3g}" + (f" ({ci[0]:.3g}, {ci[1]:.3g})" if ci else ""))
        for b in fit.get("isoflop", {}).get("budgets", []):
            if b.get(f"{axis}_opt"):
                ax.scatter(b["C"], b[f"{axis}_opt"], color=color, marker="x")
    ax.set(xscale="log", yscale="log", xlabel="training compute C (FLOPs, log scale)",
           ylabel="N* (parameters) / D* (tokens)", title="compute-optimal allocation, extrapolated")
    ax.legend(fontsize=8)
    if tasks:
        ax = axes[0, 1]
        for name, color in zip(tasks, plt.cm.tab10.colors):
            s1 = fit["downstream"][name]["nll_vs_compute"]
            s2 = fit["downstream"][name]["accuracy_vs_nll"]
            chained = sigmoid_accuracy(s1["coefficient"] * cs ** s1["exponent"], s2["lo"], s2["slope"], s2["mid"])
            ax.plot(cs, chained, color=color, label=f"{name}: C -> NLL -> accuracy")
            d1, d2 = s1.get("bootstrap_ln_coefficient_exponent"), s2.get("bootstrap")
            if d1 and d2:
                m = min(len(d1), len(d2))
                d1, d2 = np.array(d1[:m]), np.array(d2[:m])
                nll = np.exp(d1[:, :1] + d1[:, 1:] * np.log(cs)[None, :])
                lo, hi = np.percentile(sigmoid_accuracy(nll, d2[:, :1], d2[:, 1:2], d2[:, 2:3]), [2.5, 97.5], axis=0)
                ax.fill_between(cs, lo, hi, color=color, alpha=0.2, linewidth=0)
            t = tasks[name]
            yerr = [[t["acc"] - t["acc_ci"][0]], [t["acc_ci"][1] - t["acc"]]] if "acc_ci" in t else None
            ax.errorbar([C], [t["acc"]], yerr=yerr, fmt="o", color=color, capsize=6, markeredgecolor="black",
                        label=f"{name} at {C:.3g}: {t['acc']:.3f}")
        ax.set(xscale="log", ylim=(0, 1), xlabel="training compute C (FLOPs, log scale)",
               ylabel="accuracy (fraction correct)", title="downstream accuracy, chained (95% band)")
        ax.legend(fontsize=8)
    return _save(plt, fig, axes.flat, path)
