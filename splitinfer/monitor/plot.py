"""Figures of a model along its operations: the classic split-computing profile (per-layer latency and output size,
valid cut points marked) and the cut points with the bytes live at each."""

from __future__ import annotations

from pathlib import Path


def plot_profile(profile, path: Path, title: str | None = None) -> Path:
    import matplotlib  # lazy: ~0.3 s to import, for this one figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    ops = [o for o in profile.ops if not o.is_input]
    xs = list(range(len(ops)))
    pos = {o.name: i for i, o in enumerate(ops)}
    fig, ax = plt.subplots(figsize=(max(8.0, min(24.0, len(ops) / 10)), 4.8), dpi=110)
    ax.bar(xs, [o.latency_ms for o in ops], width=1.0, color="#4c72b0", label="latency per operation (ms)")
    ax.set_xlabel("operation (topological order)")
    ax.set_ylabel("latency (ms)")
    ax.set_xlim(-1, len(ops))
    ax2 = ax.twinx()
    ax2.plot(xs, [max(o.output_bytes, 1) / 1024 for o in ops], color="#dd8452", lw=1.2, label="output size (KiB)")
    cuts = [(pos[c.after], c.bytes / 1024) for c in profile.cut_points if c.after in pos]
    if cuts:
        ax2.scatter([c[0] for c in cuts], [c[1] for c in cuts], marker="v", s=22, color="#c44e52", zorder=5,
                    label=f"valid cut point ({len(cuts)})")
    input_kib = sum(o.output_bytes for o in profile.ops if o.is_input) / 1024
    if input_kib:
        ax2.axhline(input_kib, color="#999999", ls=":", lw=1, label=f"model input ({input_kib:,.0f} KiB)")
    ax2.set_yscale("log")
    ax2.set_ylabel("output size (KiB, log)")
    handles = ax.get_legend_handles_labels()
    handles2 = ax2.get_legend_handles_labels()
    ax.legend(handles[0] + handles2[0], handles[1] + handles2[1], loc="upper center", bbox_to_anchor=(0.5, -0.14),
              ncol=4, fontsize=8, frameon=False)
    shape = "x".join(str(d) for d in profile.input_shapes[0]) if profile.input_shapes else ""
    ax.set_title(title or (f"{profile.model} {shape} batch {profile.batch}: "
                           f"{profile.totals.flops / 1e9:.2f} GFLOPs, {profile.totals.latency_ms:.1f} ms whole model"))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_cut_points(graph, rows: list[dict], path: Path) -> None:
    """The output size of every operation along the model, the valid cut points marked (rows: cut_point_rows)."""
    import matplotlib  # lazy: ~0.3 s to import, for this one figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after choosing the Agg backend

    sizes = [max(graph.tensors[t].nbytes() for t in node.outputs) if node.outputs else 0
             for node in graph.nodes.values()]
    fig, ax = plt.subplots(figsize=(12, 4))
    ax.plot(range(len(sizes)), [s / 1024 for s in sizes], color="0.7", lw=1, label="output size of each operation")
    ax.scatter([r["position"] for r in rows], [r["bytes"] / 1024 for r in rows], color="tab:red", s=18, zorder=3,
               label="valid cut point (live bytes)")
    ax.set_yscale("log")
    ax.set_xlabel("operation (topological order)")
    ax.set_ylabel("KiB (batch 1)")
    ax.set_title(f"{graph.name}: {len(rows)} single-tensor cut points")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
