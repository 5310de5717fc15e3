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


class PlotInputError(ValueError):
    """A figure was asked for data that is not what the unit tools write (missing fields, wrong shapes)."""


def _require(result: dict[str, Any], keys: tuple[str, ...], what: str) -> None:
    missing = [k for k in keys if k not in result]
    if missing:
        raise PlotInputError(f"{what} result has no {', '.join(missing)}: pass the dict the {what} step returns, unchanged")


def _shape(values: Any, shape: tuple[int, ...], name: str, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.shape != shape:
        raise PlotInputError(f"{what} result: {name} has shape {array.shape}, expected {shape}")
    if not np.isfinite(array).all():
        raise PlotInputError(f"{what} result: {name} contains NaN or inf")
    return array


def _check_map(unit_map: UnitMap) -> None:
    for kind, codes in unit_map.classes.items():
        if codes.dim() != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
            raise PlotInputError(f"unit map {kind} classes have shape {tuple(codes.shape)}; expected [layers, units], both > 0")
        if int(codes.min()) < 0 or int(codes.max()) >= len(CLASSES):
            raise PlotInputError(f"unit map {kind} classes hold codes outside 0..{len(CLASSES) - 1}: not a unit map's classes")


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def class_share_bars(unit_map: UnitMap, path: Path) -> Path:
    """Per-layer stacked bars: share of the layer's unit parameters in each class."""
    _check_map(unit_map)
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
    _check_map(unit_map)
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
    _require(result, ("classes", "param_share_of_row", "units"), "transfer")
    names = list(result["classes"])
    k = len(names)
    share = _shape(result["param_share_of_row"], (k, k), "param_share_of_row", "transfer") * 100
    units = _shape(result["units"], (k, k), "units", "transfer").astype(int)
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
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
    _require(result, ("ks", "layers", "refusal_distance", "compliance_distance", "gap_per_layer", "n_prompts", "verdict"),
             "probe")
    ks, layers = np.asarray(result["ks"]), np.asarray(result["layers"])
    grid = (len(ks), len(layers))
    ref = _shape(result["refusal_distance"], grid, "refusal_distance", "probe")  # [K, L]
    comp = _shape(result["compliance_distance"], grid, "compliance_distance", "probe")
    gap = _shape(result["gap_per_layer"], grid[1:], "gap_per_layer", "probe")
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
    """class_shares.png and unit_map.png in `out_dir`."""
    out_dir = Path(out_dir)
    return [class_share_bars(unit_map, out_dir / "class_shares.png"), unit_map_heatmap(unit_map, out_dir / "unit_map.png")]

