"""The benchmark's Markdown report (also what it prints)."""

from __future__ import annotations

from .. import provenance
from .layers import IMPL_FUNCS


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def render(report: dict) -> str:
    """The Markdown report (also what is printed)."""
    h = report["header"]
    lines = [
        f"# ACE-Merging benchmark ({h['mode']})",
        "",
        *provenance.markdown_lines(h),
        f"- {h['threads']} torch thread(s), device {h['device']}",
        f"- load average (1/5/15 min) at start: {h['load_start']}, at end: {h['load_end']}",
        f"- eps={h['eps']}, tau={h['tau']}, k_frac={h['k_frac']}, float32",
    ]
    if report["runs"]:  # none in --memory mode
        lines += merge_time_section(report)
    lines += tracks_section(report.get("tracks") or [])
    if report.get("memory"):
        spec = report["memory_spec"]
        lines += [
            "",
            "## Peak memory against the number of experts (ACEMerging, one subprocess each)",
            "",
            f"Synthetic GPT-2-style experts (n_embd={spec['n_embd']}, n_layer={spec['n_layer']}, "
            f"vocab={spec['vocab_size']}; one model = "
            f"{_mib(report['memory'][0]['model_bytes'])} MiB) saved with `save_pretrained` "
            "(safetensors). Peak RSS during `ACEMerging.run` (loading included), sampled every ms; "
            "baseline = RSS after imports, before the run (`getrusage`'s ru_maxrss is not used: "
            "a child started from the benchmark inherits the parent's peak). `T × largest "
            "param` = the task vectors of the largest parameter (the embedding), which the "
            "driver stacks.",
            "",
            "| T | streaming | peak RSS MiB | peak − baseline MiB | (peak − baseline) / model "
            "| T × largest param MiB | merge s |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in report["memory"]:
            extra = row["peak_rss"] - row["baseline_rss"]
            lines.append(
                f"| {row['tasks']} | {row['streaming']} | {_mib(row['peak_rss'])} | {_mib(extra)} "
                f"| {extra / row['model_bytes']:.2f} | {_mib(row['layer_task_vectors_bytes'])} "
                f"| {row['seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def merge_time_section(report: dict) -> list:
    """The report's merge-time table and ratios against the targets (one line per run)."""
    h = report["header"]
    lines = [
        "",
        "## Merge time (all 2-D layers of the model; interleaved, median of repeats)",
        "",
        "Model time = Σ over unique layer shapes of count × mean(homogeneous instance, "
        "heterogeneous instance): half of each shape's layers in each branch. `rel diff` = max "
        "over layers of ‖X − ours‖_F / ‖ours‖_F (tsvm is a different method: its difference is "
        "not an error). `rel err f64` = the same against ours computed in float64 (runs with "
        "the reference only). `peak MiB` = peak extra memory during one layer's merge "
        + ("(CUDA max_memory_allocated)." if h["device"].startswith("cuda")
           else "(RSS sampled every ms)."),
        "",
        "| model | T | impl | time s | × ours | ours / impl | peak MiB | rel diff vs ours "
        "| rel err f64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        ours = run["impls"]["ours"]["seconds"]
        for impl, row in run["impls"].items():
            rel = "" if impl in ("ours", "floor", "floor_wsigma") else f"{row['rel_diff']:.2e}"
            f64 = (
                f"{row['rel_err_f64']:.2e}"
                if "reference" in run["impls"] and impl in IMPL_FUNCS
                else ""
            )
            lines.append(
                f"| {run['model']} | {run['tasks']} | {impl} | {row['seconds']:.2f} | "
                f"{row['seconds'] / ours:.2f} | {ours / row['seconds']:.2f} | "
                f"{_mib(row['peak_bytes'])} | {rel} | {f64} |"
            )
    lines += ["", "### Ratios against the targets", ""]
    for run in report["runs"]:
        impls = run["impls"]
        ours = impls["ours"]["seconds"]
        parts = [f"{run['model']} T={run['tasks']}:"]
        if "reference" in impls:
            by_shape = ", ".join(
                f"{k} {v:.1e}" for k, v in impls["reference"]["rel_diff_by_shape"].items()
            )
            parts.append(
                f"reference/ours = {impls['reference']['seconds'] / ours:.2f}x "
                f"(target >= 2), rel diff {impls['reference']['rel_diff']:.1e} "
                f"(target <= 1e-4; by shape: {by_shape}; ours vs float64 "
                f"{impls['ours']['rel_err_f64']:.1e}, reference vs float64 "
                f"{impls['reference']['rel_err_f64']:.1e});"
            )
        if "tsvm" in impls:
            parts.append(f"tsvm/ours = {impls['tsvm']['seconds'] / ours:.2f}x (target > 1);")
        if "floor" in impls:
            parts.append(f"ours/floor = {ours / impls['floor']['seconds']:.2f} (target <= 1.3);")
        if "floor_wsigma" in impls:
            parts.append(f"ours/floor_wsigma = {ours / impls['floor_wsigma']['seconds']:.2f};")
        parts.append(
            f"branches: {run['branches']['homogeneous']} hom / "
            f"{run['branches']['heterogeneous']} het layer instances"
        )
        lines.append("- " + " ".join(parts))
    return lines


def tracks_section(tracks: list) -> list:
    """The report's lines on float32 against float64 on the embedded tracks (none if not run)."""
    if not tracks:
        return []
    lines = [
        "",
        "## float32 against float64 on the embedded tracks' real weights",
        "",
        "Every 2-D weight the track's ACE preset merges, merged from the same float32 task vectors "
        "by the default (`precision=float32`: one float32 pass and its error estimate), by the "
        "float32 pass alone (estimate off) and by `precision=float64`: `rel err` = "
        "‖W₃₂ − W₆₄‖_F / ‖W₆₄‖_F against the float64 merge; `default / pass` = what the estimate "
        "costs; `estimate` = the default's predicted error (an upper estimate).",
        "",
        "| track | method | layers | max rel err | median | float32 s | float32 pass s | "
        "default / pass | float64 s | float64 / default |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for track in tracks:
        if not track["built"]:
            lines.append(f"| {track['track']} | {track['method']} | not built "
                         f"(`python -m fusion_bench_ace.mini build --track {track['track']}`) "
                         "| | | | | | | |")
            continue
        shown = dict(track["options"])
        if shown["eps_mode"] == "absolute":  # the paper's: the relative options are unused
            shown = {k: v for k, v in shown.items() if k not in ("eps_mode", "eps_rel")}
        if shown["gamma_mode"] == "paper":
            shown = {k: v for k, v in shown.items() if k not in ("gamma_mode", "tau_scale_free")}
        options = ", ".join(f"{k}={v}" for k, v in shown.items())
        lines.append(
            f"| {track['track']} | {track['method']} ({options}) | {len(track['layers'])} | "
            f"{track['max_rel_err']:.1e} | {track['median_rel_err']:.1e} | "
            f"{track['seconds_float32']:.2f} | {track['seconds_float32_pass']:.2f} | "
            f"{track['seconds_float32'] / track['seconds_float32_pass']:.2f} | "
            f"{track['seconds_float64']:.2f} | "
            f"{track['seconds_float64'] / track['seconds_float32']:.2f} |"
        )
        for layer in track["layers"]:
            estimate = layer["estimate"]
            details.append(
                f"| {track['track']} | {layer['name']} | {'x'.join(map(str, layer['shape']))} | "
                f"{'het' if layer['heterogeneous'] else 'hom'} | {layer['solved_in']} | "
                f"{layer['rel_err']:.1e} | "
                + ("–" if estimate is None else f"{estimate:.1e}") + " |"
            )
    if details:
        lines += ["", "| track | layer | shape | branch | solved in | rel err | estimate |",
                  "|---|---|---|---|---|---|---|", *details]
    return lines
