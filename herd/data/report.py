"""stats.json (documents and bytes kept and removed per stage) and the funnel plot."""

from __future__ import annotations

from pathlib import Path


def aggregate_stats(results: list[list[dict]], stage_order: list[str]) -> dict:
    """Sum the per-shard counts of every pass into one table, stages in pipeline order."""
    stages: dict[str, dict] = {}
    for pass_results in results:
        for r in pass_results:
            for name, s in r["stats"].items():
                t = stages.setdefault(name, {"docs_in": 0, "bytes_in": 0, "docs_removed": 0, "bytes_removed": 0,
                                             "reasons": {}})
                for k in ("docs_in", "bytes_in", "docs_removed", "bytes_removed"):
                    t[k] += s[k]
                for reason, n in s["reasons"].items():
                    t["reasons"][reason] = t["reasons"].get(reason, 0) + n
    ordered = {name: stages[name] for name in ["read"] + stage_order if name in stages}
    for t in ordered.values():
        t["docs_kept"] = t["docs_in"] - t["docs_removed"]
        t["bytes_kept"] = t["bytes_in"] - t["bytes_removed"]
        t["reasons"] = dict(sorted(t["reasons"].items(), key=lambda kv: (-kv[1], kv[0])))
    last = results[-1]
    read = ordered.get("read", {"docs_in": 0, "bytes_in": 0})
    output = {"docs": sum(r["docs_out"] for r in last), "bytes": sum(r["bytes_out"] for r in last),
              "shards": len(last)}
    if any("routes" in r for r in last):  # route_by: documents, bytes and shard files per folder
        routes: dict[str, dict] = {}
        for r in last:
            for name, (n_docs, n_bytes) in r.get("routes", {}).items():
                t = routes.setdefault(name, {"docs": 0, "bytes": 0, "shards": 0})
                t["docs"], t["bytes"], t["shards"] = t["docs"] + n_docs, t["bytes"] + n_bytes, t["shards"] + 1
        output["routes"] = dict(sorted(routes.items()))
    return {"input": {"docs": read["docs_in"], "bytes": read["bytes_in"]}, "output": output, "stages": ordered}


def format_stats(stats: dict) -> str:
    lines = [f"{'stage':<18} {'docs in':>10} {'removed':>10} {'kept':>10} {'kept %':>7}  top reasons"]
    for name, s in stats["stages"].items():
        pct = 100 * s["docs_kept"] / s["docs_in"] if s["docs_in"] else 100.0
        reasons = ", ".join(f"{k} {v}" for k, v in list(s["reasons"].items())[:3])
        lines.append(f"{name:<18} {s['docs_in']:>10,} {s['docs_removed']:>10,} {s['docs_kept']:>10,} {pct:>6.1f}%  "
                     f"{reasons}")
    o, i = stats["output"], stats["input"]
    lines.append(f"kept {o['docs']:,} of {i['docs']:,} documents, {o['bytes']:,} of {i['bytes']:,} bytes "
                 f"in {o['shards']} shard(s)")
    if "routes" in o:
        lines.append("routed: " + ", ".join(f"{k} {v['docs']:,}" for k, v in o["routes"].items()))
    return "\n".join(lines)


def plot_funnel(stats: dict, path: str | Path) -> Path | None:
    """Documents (and bytes) remaining after each stage, as horizontal bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(stats["stages"])
    docs = [stats["stages"][n]["docs_kept"] for n in names]
    mb = [stats["stages"][n]["bytes_kept"] / 1e6 for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.5), sharey=True)
    for ax, values, label in ((axes[0], docs, "documents kept"), (axes[1], mb, "MB kept")):
        ax.barh(range(len(names)), values, color="#4c72b0")
        ax.set_xlabel(label)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,.0f}" if label.startswith("doc") else f" {v:,.2f}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"herd data run: {stats['output']['docs']:,} of {stats['input']['docs']:,} documents kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
