"""The classic split-computing figure: per-layer latency and output size along the model, valid cut points marked."""

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
