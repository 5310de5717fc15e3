"""Figures for unit maps, role transfer and the probe (matplotlib, Agg backend, PNG written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from safeunits.io import atomic_path  # noqa: E402
from safeunits.units.assignment import CLASSES  # noqa: E402
from safeunits.units.unit_map import UnitMap  # noqa: E402

CLASS_COLORS = {"SCU": "#d62728", "UCU": "#1f77b4", "CU": "#c7c7c7", "RU": "#2ca02c"}


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def class_share_bars(unit_map: UnitMap, path: Path) -> Path:
    """Per-layer stacked bars: share of the layer's unit parameters in each class."""
    summary = unit_map.summary()["per_layer"]
    layers = np.arange(len(summary))
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(layers) + 2), 3.5))
    bottom = np.zeros(len(layers))
    for name in CLASSES:
        share = np.array([row[name]["param_share"] for row in summary]) * 100
        ax.bar(layers, share, bottom=bottom, color=CLASS_COLORS[name], label=name, width=0.85)
        bottom += share
    ax.set_xlabel("layer")
    ax.set_ylabel("% of the layer's unit parameters")
    ax.set_ylim(0, 100)
    ax.set_title(f"unit classes per layer ({unit_map.model_type}, {unit_map.settings.get('score_method', '')})")
    ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18), frameon=False)
    return _save(fig, path)


def unit_map_heatmap(unit_map: UnitMap, path: Path) -> Path:
    """Layers x units coloured by class: MLP channels (left) and attention heads (right)."""
    cmap = ListedColormap([CLASS_COLORS[c] for c in CLASSES])
    mlp = unit_map.classes["mlp"].numpy()
    head = unit_map.classes["head"].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(12, max(3, 0.18 * mlp.shape[0] + 1.5)),
                             gridspec_kw={"width_ratios": [5, 1]})
    for ax, data, title in ((axes[0], mlp, "MLP channels"), (axes[1], head, "attention heads")):
        ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=-0.5, vmax=len(CLASSES) - 0.5)
        ax.set_title(title)
        ax.set_xlabel("unit")
        ax.set_ylabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=CLASS_COLORS[c]) for c in CLASSES]
    fig.legend(handles, CLASSES, ncol=4, loc="lower center", frameon=False)
    fig.suptitle(f"unit map: {unit_map.model_type}")
    fig.subplots_adjust(bottom=0.18)
    return _save(fig, path)


def transfer_heatmap(result: dict[str, Any], path: Path) -> Path:
    """4x4 role-transfer heatmap: share of each before-class's parameters that went to each after-class."""
    share = np.array(result["param_share_of_row"]) * 100
    units = np.array(result["units"])
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    names = result["classes"]
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("class after")
    ax.set_ylabel("class before")
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{share[i, j]:.0f}%\n{units[i, j]}u", ha="center", va="center",
                    color="white" if share[i, j] > 60 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="% of before-class parameters")
    ax.set_title("role transfer")
    return _save(fig, path)


def probe_plot(result: dict[str, Any], path: Path) -> Path:
    """Three panels: distance vs k (mean over layers), per-layer distance (mean over k), per-layer gap."""
    ks = np.array(result["ks"])
    layers = np.array(result["layers"])
    ref = np.array(result["refusal_distance"])  # [K, L]
    comp = np.array(result["compliance_distance"])
    gap = np.array(result["gap_per_layer"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(ks, ref.mean(1), "o-", color=CLASS_COLORS["SCU"], label="clean vs refusal")
    axes[0].plot(ks, comp.mean(1), "s-", color=CLASS_COLORS["UCU"], label="clean vs compliance")
    axes[0].set_xlabel("continuation tokens k")
    axes[0].set_ylabel("cosine distance (mean over layers)")
    axes[0].legend()
    axes[1].plot(layers, ref.mean(0), "-", color=CLASS_COLORS["SCU"], label="refusal")
    axes[1].plot(layers, comp.mean(0), "-", color=CLASS_COLORS["UCU"], label="compliance")
    axes[1].set_xlabel("layer")
    axes[1].set_ylabel("cosine distance (mean over k)")
    axes[1].legend()
    axes[2].bar(layers, gap, color=np.where(gap > 0, CLASS_COLORS["RU"], "#ff7f0e"))
    axes[2].axhline(0, color="black", linewidth=0.8)
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("d(compliance) - d(refusal)")
    axes[2].set_title("> 0: closer to refusal")
    fig.suptitle(f"reasoning-direction probe ({result['n_prompts']} prompts): {result['verdict']}")
    return _save(fig, path)


def write_map_plots(unit_map: UnitMap, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    return [class_share_bars(unit_map, out_dir / "class_shares.png"), unit_map_heatmap(unit_map, out_dir / "unit_map.png")]

