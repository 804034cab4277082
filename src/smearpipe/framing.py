"""Frame a WBC crop around its nucleus, so that the cell fills the crop the same way in every lab.

Why: magnification and the way crops are cut differ between labs. In PBC (fixed magnification,
360 px frames) a lymphocyte looks small and a monocyte large; in BCCD's crops every cell fills its
crop. A classifier that learned absolute cell size calls every tightly cut cell a monocyte.
:func:`frame_cell` finds the nucleus (the most strongly stained object, dark in the red channel under
Romanowsky stains) near the crop centre and cuts a square of ``margin`` times the nucleus extent
around it, at training and at inference, so that the classifier sees cells at a common relative size.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["nucleus_box", "frame_cell"]

_WORK_SIDE = 128  # the nucleus is located on a copy at most this many pixels on its long side


def nucleus_box(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """``(x0, y0, x1, y1)`` of the WBC nucleus nearest the crop centre, in ``rgb``'s pixels; None if none is found.

    The red channel is split into three classes by multi-level Otsu thresholding and the darkest kept (nuclei absorb red light under Romanowsky
    stains; red cells, cytoplasm and background do not), the mask is closed so that the lobes of a
    segmented nucleus merge, and of the components at least a fifth of the largest one's area the
    one nearest the centre is kept.
    """
    h, w = rgb.shape[:2]
    f = min(1.0, _WORK_SIDE / max(h, w))
    small = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA) if f < 1 else rgb
    red = cv2.GaussianBlur(small[..., 0], (3, 3), 0)
    if int(red.max()) - int(red.min()) < 20:  # flat crop: nothing stained
        return None
    # three classes (nucleus; cytoplasm and red cells; background): the darkest one is the nucleus. Plain
    # Otsu would split red cells from background on wide frames where the nucleus is a small fraction.
    from skimage.filters import threshold_multiotsu

    low = threshold_multiotsu(red, classes=3)[0]
    mask = (red <= low).astype(np.uint8) * 255
    k = max(3, (min(mask.shape) // 12) | 1)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, _, stats, centroids = cv2.connectedComponentsWithStats(mask)
    if n < 2:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = np.flatnonzero(areas >= 0.2 * areas.max()) + 1
    centre = np.array([small.shape[1] / 2, small.shape[0] / 2])
    best = keep[np.argmin(np.linalg.norm(centroids[keep] - centre, axis=1))]
    x, y, bw, bh = stats[best, :4]
    return (int(x / f), int(y / f), int(np.ceil((x + bw) / f)), int(np.ceil((y + bh) / f)))


def frame_cell(rgb: np.ndarray, margin: float) -> np.ndarray:
    """A square crop of side ``margin`` x the nucleus extent, centred on the nucleus.

    Parts outside the image are filled by replicating its border. If no nucleus is found the crop is
    returned unchanged (the classifier then sees it as cut).

    Parameters
    ----------
    rgb : (H, W, 3) uint8 ndarray
        A crop around one WBC.
    margin : float
        Side of the output relative to the longer side of the nucleus box (> 1).
    """
    if not margin > 1:
        raise ValueError(f"frame margin must be > 1, got {margin!r}")
    box = nucleus_box(rgb)
    if box is None:
        return rgb
    x0, y0, x1, y1 = box
    side = max(8, int(round(margin * max(x1 - x0, y1 - y0))))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = cx - side // 2, cy - side // 2
    h, w = rgb.shape[:2]
    pad = max(0, -left, -top, left + side - w, top + side - h)
    if pad:
        rgb = cv2.copyMakeBorder(rgb, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        left, top = left + pad, top + pad
    return np.ascontiguousarray(rgb[top:top + side, left:left + side])
