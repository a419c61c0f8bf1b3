"""Pictures: loss curves, annotated images and montages (PNG bytes out, no file access)."""

from __future__ import annotations

import cv2
import numpy as np

from fkd_core.types import FAILURE_NME, Box

# Colours per iBUG 300-W region (BGR): jaw, brows, nose, eyes, mouth.
_REGIONS = (
    (0, 17, (255, 200, 0)),
    (17, 27, (0, 200, 255)),
    (27, 36, (0, 255, 0)),
    (36, 48, (255, 0, 255)),
    (48, 68, (0, 0, 255)),
)


def loss_curve_figure(
    epochs: list[int],
    train: list[float],
    val: list[float],
    val_nme: list[float] | None = None,
    averaged: str | None = None,
    raw_val_nme: list[float] | None = None,
):
    """Train/validation MSE per epoch (log scale), with validation NME on a second axis; a matplotlib figure.

    ``averaged`` names the weight average that ``val`` and ``val_nme`` score (e.g. "EMA 0.998"); the training MSE
    is always the raw weights' (measured while they train), and ``raw_val_nme`` is the raw weights' validation.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    of = f" ({averaged} weights)" if averaged else ""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(epochs, train, label="train MSE (raw weights)" if averaged else "train MSE")
    ax.plot(epochs, val, label="validation MSE" + of)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 on a 3-epoch run
    ax.set_ylabel("MSE (keypoints in [-1, 1])")
    if val_nme:
        ax2 = ax.twinx()
        ax2.plot(epochs, val_nme, color="tab:green", linestyle="--", label="validation NME" + of)
        if raw_val_nme:
            ax2.plot(epochs, raw_val_nme, color="tab:olive", linestyle=":", label="validation NME (raw weights)")
        ax2.set_ylabel("NME")
        # one legend for both axes: two would overlap
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = h1 + h2, l1 + l2
        legend_ax = ax2
    else:
        (handles, labels), legend_ax = ax.get_legend_handles_labels(), ax
    # below the plot, where it covers no curve
    legend_ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize="small")
    ax.grid(alpha=0.3)
    fig.set_size_inches(7, 4 + 0.25 * ((len(labels) + 1) // 2))
    fig.tight_layout()
    return fig


def loss_curve_png(*args, **kwargs) -> bytes:
    """:func:`loss_curve_figure` as PNG bytes."""
    import io

    import matplotlib.pyplot as plt

    fig = loss_curve_figure(*args, **kwargs)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def quality_colour(quality: float | None) -> tuple[int, int, int]:
    """BGR for a face's ``quality`` (P(NME > 0.10)): green at 0, through yellow at 0.25, red from 0.5 on; light
    grey for None (a face without trust columns)."""
    if quality is None or not np.isfinite(quality):
        return (200, 200, 200)
    t = min(max(float(quality) / 0.5, 0.0), 1.0)
    return (0, round(255 * min(1.0, 2 * (1 - t))), round(255 * min(1.0, 2 * t)))


def draw_faces(
    gray_or_bgr: np.ndarray,
    boxes: list[Box],
    keypoints: list[np.ndarray],
    radius: int | None = None,
    truth: list[np.ndarray] | None = None,
    quality: list[float | None] | None = None,
    labels: list[str] | None = None,
    max_side: int = 0,
) -> np.ndarray:
    """BGR image with boxes and keypoints drawn (truth, if given, as white hollow circles).

    With ``quality`` (one per face) each face's box and points take its :func:`quality_colour` instead of the
    per-region colours, and ``labels`` are written above the boxes. With ``max_side`` the picture is at most that
    long (the image is shrunk first and everything drawn at that scale, so lines stay sharp); 0: full size."""
    h, w = gray_or_bgr.shape[:2]
    scale = max_side / max(h, w) if max_side and max(h, w) > max_side else 1.0
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        gray_or_bgr = cv2.resize(gray_or_bgr, size, interpolation=cv2.INTER_AREA)
        boxes = [Box(b.x * scale, b.y * scale, b.w * scale, b.h * scale) for b in boxes]
        keypoints = [np.asarray(k) * scale for k in keypoints]
        truth = [np.asarray(t) * scale for t in truth] if truth else truth
    img = cv2.cvtColor(gray_or_bgr, cv2.COLOR_GRAY2BGR) if gray_or_bgr.ndim == 2 else gray_or_bgr.copy()
    r = radius or max(1, round(max(img.shape[:2]) / 300))
    colours = [quality_colour(q) for q in quality] if quality is not None else [None] * len(boxes)
    for i, b in enumerate(boxes):
        colour = colours[i] or (0, 255, 255)
        cv2.rectangle(img, (round(b.x), round(b.y)), (round(b.x + b.w), round(b.y + b.h)), colour, max(1, r // 2))
        if labels:
            scale = max(0.4, b.w / 250)
            org = (round(b.x), max(12, round(b.y) - 4))
            cv2.putText(img, labels[i], org, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, max(1, r // 2), cv2.LINE_AA)
    for t in truth or []:
        for x, y in t:
            cv2.circle(img, (round(float(x)), round(float(y))), r + 1, (255, 255, 255), 1, cv2.LINE_AA)
    for i, kp in enumerate(keypoints):
        for lo, hi, colour in _REGIONS:
            for x, y in kp[lo:hi]:
                c = colours[i] if i < len(colours) and colours[i] is not None else colour
                cv2.circle(img, (round(float(x)), round(float(y))), r, c, -1, cv2.LINE_AA)
    return img


def montage(tiles: list[np.ndarray], cols: int = 6, size: int = 160) -> np.ndarray:
    """Square tiles side by side in rows."""
    if not tiles:
        return np.zeros((size, size, 3), np.uint8)
    resized = [cv2.resize(t if t.ndim == 3 else cv2.cvtColor(t, cv2.COLOR_GRAY2BGR), (size, size)) for t in tiles]
    while len(resized) % cols:
        resized.append(np.zeros_like(resized[0]))
    return np.vstack([np.hstack(resized[i : i + cols]) for i in range(0, len(resized), cols)])


def png_bytes(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img)
    if not ok:  # pragma: no cover
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def risk_coverage_png(quality: np.ndarray, nme: np.ndarray, title: str, threshold: float = FAILURE_NME) -> bytes:
    """Keeping faces best ``quality`` first, the failure rate (NME > ``threshold``) among those kept, against the
    best possible order (by the true NME) and keeping all."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fkd_core import trust as tr

    failed = np.asarray(nme) > threshold
    cov, risk = tr.risk_coverage(quality, failed)
    best_cov, best_risk = tr.risk_coverage(np.asarray(nme), failed)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(cov * 100, risk * 100, label=f"kept by quality (AUROC {tr.auroc(quality, failed):.3f})")
    ax.plot(best_cov * 100, best_risk * 100, ":", color="grey", label="kept by true NME (best possible)")
    ax.axhline(failed.mean() * 100, color="black", lw=0.8, ls="--", label="keeping all")
    for c in (80, 90):
        ax.axvline(c, color="grey", lw=0.5)
    ax.set_xlabel("faces kept, best quality first (%)")
    ax.set_ylabel(f"FR@{threshold:.2f} among the kept (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, 100)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
