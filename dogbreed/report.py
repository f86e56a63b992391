"""The HTML report of a scan's output, its plots, and the one function that draws a result on a photo.

`describe` and `annotate` are shared with ``dogbreed predict`` so the printed label, the annotated file
and the report's gallery always say the same thing.
"""

from __future__ import annotations

import base64
import io
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont, ImageOps

from dogbreed.config import PhotoConfig
from dogbreed.errors import UsageError, replacing, report_target
from dogbreed.table import readers, schema
from dogbreed.vision.decode import ImageError
from dogbreed.vision.geometry import Geometry
from dogbreed.vision.worker import PhotoReader, PhotoTask

TEMPLATES = Path(__file__).parent / "templates"

# Label background per status; white text reads on each of them.
STATUS_COLORS = {
    "dog": (27, 120, 55),
    "dog_and_human": (118, 42, 131),
    "human": (33, 102, 172),
    "neither": (90, 90, 90),
    "error": (178, 24, 43),
    "skipped": (140, 81, 10),
    "deleted": (60, 60, 60),
}
FACE_COLOR = (255, 221, 0)  # yellow with a dark rim: visible on both skin and sky
IMAGE_STATUSES = schema.OK_STATUSES  # rows whose photo was decoded, so there is something to draw on
PROBLEM_STATUSES = ("error", "skipped")


class ReportError(UsageError):
    """An output folder a report cannot be built from; the message names the folder."""


def _get(row: Mapping[str, Any], key: str) -> Any:
    """row[key] with pandas/arrow missing values (None, NaN, NA) turned into None."""
    value = row.get(key) if hasattr(row, "get") else None
    if value is None or value is pd.NA:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe(row: Mapping[str, Any]) -> str:
    """The one-line label of a result row, e.g. ``dog: Labrador retriever (0.91)`` or ``error: <reason>``."""
    status = _get(row, "status") or "unknown"
    breed, prob = _get(row, "breed"), _get(row, "breed_prob")
    guess = f"{breed} ({prob:.2f})" if breed and prob is not None else (breed or "")
    if status == "dog":
        return f"dog: {guess}" if guess else "dog"
    if status == "dog_and_human":
        return f"dog and human: {guess}" if guess else "dog and human"
    if status == "human":
        return f"human: looks like {guess}" if guess else "human"
    if status in PROBLEM_STATUSES:
        reason = _get(row, "error")
        return f"{status}: {_one_line(reason)}" if reason else status
    return _one_line(status)


def _faces(row: Mapping[str, Any]) -> list[tuple[int, int, int, int]]:
    faces = _get(row, "faces")
    if faces is None:
        return []
    return [(int(f["x"]), int(f["y"]), int(f["w"]), int(f["h"])) for f in faces]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, max_width: int) -> str:
    """The text, cut with an ellipsis so it fits max_width pixels."""
    if draw.textlength(text, font=font) <= max_width:
        return text
    while text and draw.textlength(text + "…", font=font) > max_width:
        text = text[:-1]
    return text + "…"


def annotate(image: Image.Image, row: Mapping[str, Any], full_size: tuple[int, int] | None = None) -> Image.Image:
    """A copy of the photo, EXIF-oriented, with the row's face boxes outlined and its `describe` label drawn on top.

    Face boxes are in the full-size oriented frame (the row's width x height, or `full_size`); they are
    scaled to the image, so a thumbnail or a reduced JPEG decode can be passed.
    """
    img = ImageOps.exif_transpose(image).convert("RGB")  # exif_transpose drops the tag: applying it twice is safe
    draw = ImageDraw.Draw(img)
    width, height = img.size
    full_w, full_h = full_size or (_get(row, "width") or width, _get(row, "height") or height)
    sx, sy = width / full_w, height / full_h

    line = max(2, round(min(width, height) / 150))
    for x, y, w, h in _faces(row):
        box = [round(x * sx), round(y * sy), round((x + w) * sx) - 1, round((y + h) * sy) - 1]
        draw.rectangle(box, outline=(0, 0, 0), width=line + 2)
        draw.rectangle([box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1], outline=FACE_COLOR, width=line)

    font = _font(min(64, round(12 + width / 40)))  # readable on a thumbnail, modest on a full-size photo
    pad = max(2, font.size // 4) if hasattr(font, "size") else 3
    text = _fit(draw, describe(row), font, width - 2 * pad)
    left, top, right, bottom = draw.textbbox((pad, pad), text, font=font)
    color = STATUS_COLORS.get(_get(row, "status") or "", (0, 0, 0))
    draw.rectangle([0, 0, right + pad, bottom + pad], fill=color)
    draw.text((pad, pad), text, font=font, fill=(255, 255, 255))
    return img


def photo_reader(size: int | None, photos: PhotoConfig | None = None) -> PhotoReader:
    """The scan's sandboxed photo worker, making only the upright copy with longest side `size` (None: full size)."""
    return PhotoReader(PhotoTask(Geometry.copy(size), photos or PhotoConfig(), keep_small=True))


def thumbnail(reader: PhotoReader, path: str | bytes, row: Mapping[str, Any]) -> Image.Image:
    """The annotated copy of a photo that `reader` (see :func:`photo_reader`) makes; raises ImageError with the reason
    if it cannot be read. `path` may be the raw bytes of a name that is not UTF-8 (a row's `path_bytes`)."""
    result = reader(path if isinstance(path, bytes) else os.fsencode(path))
    if not result.ok:
        raise ImageError(result.error)
    return annotate(Image.fromarray(result.small, "RGB"), row, full_size=(result.width, result.height))


def write_annotated(rows: pd.DataFrame, folder: str | Path, photos: PhotoConfig | None = None) -> dict[str, Path]:
    """`predict --annotate`: a copy of each decoded photo with its answer drawn on it, as <stem>.annotated.jpg;
    returns {photo path: its copy}.

    Each photo's own name is kept for it; a second photo of one stem (a/x.jpg after b/x.png) gets the first free
    x-2, x-3 … that is no other photo's own name, and no copy is written over a photo of this call."""
    folder = Path(folder)
    images = [row for row in rows.to_dict("records") if row["status"] in IMAGE_STATUSES]
    inputs = {os.path.realpath(p) for p in rows["path"]}
    own = {folder / f"{Path(row['path']).stem}.annotated.jpg" for row in images}
    written: dict[str, Path] = {}
    reader = photo_reader(None, photos)
    try:
        for row in images:
            img = thumbnail(reader, row.get("path_bytes") or row["path"], row)
            stem, n = Path(row["path"]).stem, 1
            target = folder / f"{stem}.annotated.jpg"
            # a link of that name is never written through (it may lead to any photo): the next free name is taken
            while (target in written.values() or os.path.realpath(target) in inputs or (n > 1 and target in own)
                   or os.path.islink(target)):
                n += 1
                target = folder / f"{stem}-{n}.annotated.jpg"
            with replacing(target, parents=True) as tmp:  # whole or not at all; a hard link's other names keep theirs
                img.save(tmp, format="JPEG", quality=90)
            written[row["path"]] = target
    finally:
        reader.close()
    return written


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


def _jpeg_uri(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=82)
    return _data_uri(buf.getvalue(), "image/jpeg")


def _png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return _data_uri(buf.getvalue(), "image/png")


def plain_text(text: str) -> str:
    """Text for a matplotlib label drawn as written: a breed name's '$' must not start mathtext."""
    return str(text).replace("$", r"\$")


def breed_chart(rows: pd.DataFrame, top: int = 20) -> Figure:
    """Horizontal bars: photos per top-1 breed among rows with a dog, most common first."""
    dogs = rows[rows["status"].isin(["dog", "dog_and_human"])]
    counts = dogs["breed"].dropna().value_counts().head(top)
    fig = Figure(figsize=(6, 0.9 + 0.3 * max(len(counts), 3)), layout="constrained")
    ax = fig.add_subplot()
    if counts.empty:
        ax.text(0.5, 0.5, "no dogs found", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    ax.barh([plain_text(b) for b in counts.index[::-1]], counts.values[::-1], color="#1b7837")
    for i, value in enumerate(counts.values[::-1]):
        ax.text(value, i, f" {value}", va="center", fontsize=8)
    ax.set_xlabel("photos (top-1 breed)")
    ax.set_title(f"Breeds found (top {len(counts)} of {dogs['breed'].nunique()})")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def score_histogram(rows: pd.DataFrame) -> Figure:
    """Histogram of dog scores of decoded photos, stacked by status, to show how cleanly they separate."""
    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.add_subplot()
    scored = rows[rows["status"].isin(IMAGE_STATUSES)].dropna(subset=["dog_score"])
    groups = [(s, scored.loc[scored["status"] == s, "dog_score"]) for s in IMAGE_STATUSES]
    groups = [(s, g) for s, g in groups if len(g)]
    if groups:
        ax.hist([g for _, g in groups], bins=20, range=(0, 1), stacked=True, label=[s for s, _ in groups],
                color=["#%02x%02x%02x" % STATUS_COLORS[s] for s, _ in groups])
        ax.legend(fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("dog score (probability mass on dog classes)")
    ax.set_ylabel("photos")
    ax.set_title("Dog scores")
    ax.spines[["top", "right"]].set_visible(False)
    return fig


def _pick_gallery(rows: pd.DataFrame, limit: int) -> pd.DataFrame:
    """Up to `limit` decoded photos, taken in turn from each status so a rare status still shows."""
    shown = rows[rows["status"].isin(IMAGE_STATUSES)]
    if len(shown) <= limit:
        return shown.sort_values(["status", "path"])
    ranked = shown.sort_values(["status", "breed_prob", "path"], ascending=[True, False, True])
    ranked = ranked.assign(_turn=ranked.groupby("status").cumcount())
    return ranked.sort_values(["_turn", "status"]).head(limit).drop(columns="_turn").sort_values(["status", "path"])


def _gallery_items(rows: pd.DataFrame, thumb_size: int) -> list[dict[str, Any]]:
    items = []
    reader = photo_reader(thumb_size)
    for row in rows.to_dict("records"):
        try:
            src, problem = _jpeg_uri(thumbnail(reader, _get(row, "path_bytes") or row["path"], row)), None
        except ImageError as exc:  # a photo moved or broken since the scan must not stop the report
            src, problem = None, f"cannot show the photo now: {_one_line(exc)}"
        items.append({
            "path": row["path"], "name": Path(row["path"]).name, "status": row["status"],
            "breed": _get(row, "breed") or "", "label": describe(row), "faces": int(_get(row, "face_count") or 0),
            "src": src, "problem": problem,
        })
    reader.close()
    return items


def _environment() -> jinja2.Environment:
    # autoescape=True for every template: file names and error reasons are untrusted text.
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)


LOOKALIKE_QUERIES, LOOKALIKES = 4, 4


def _lookalikes(out: str, rows: pd.DataFrame, thumb_size: int) -> list[list[dict[str, Any]]]:
    """A few dog photos (the most confident) and their nearest rows, as gallery items; none without embeddings."""
    from dogbreed.config import ScanConfig
    from dogbreed.vectors.index import SimilarError
    from dogbreed.vectors.similar import similar

    dogs = rows[rows["status"] == "dog"].sort_values("dog_score", ascending=False)
    queries = dogs["path"].head(LOOKALIKE_QUERIES).tolist()
    if not queries:
        return []
    try:
        found = similar(out, queries, ScanConfig(), k=LOOKALIKES)
    except SimilarError:
        return []  # a table scanned before embeddings were stored
    by_path = rows.set_index("path")
    groups = []
    for f in found:
        paths = [f.query] + [h.path for h in f.hits]
        items = _gallery_items(by_path.loc[paths].reset_index(), thumb_size)
        for item, hit in zip(items[1:], f.hits):
            item["similarity"] = hit.similarity
        groups.append(items)
    return groups


def build_report(out_dir: str | Path, html_path: str | Path, max_gallery: int = 200, thumb_size: int = 320,
                 max_errors: int = 1000) -> Path:
    """Write one self-contained HTML report (plots and thumbnails embedded) of a scan output folder.

    Counts and plots describe the current answer per photo (`readers.latest`); the run block comes from
    the newest manifest. Returns the path written.
    """
    from dogbreed.table.output import Output

    html_path = Path(html_path)
    output = Output(out_dir)
    runs = output.runs(output.require())
    report_target(html_path, (".html", ".htm"), str(out_dir))
    if not runs:
        raise ReportError(f"{out_dir} has no committed scan run (expected a Delta table with {out_dir}/_delta_log).")
    rows = readers.latest(out_dir)
    status_counts = {s: int((rows["status"] == s).sum()) for s in schema.STATUSES if s != "deleted"}
    problems = rows[rows["status"].isin(PROBLEM_STATUSES)].sort_values("path")
    gallery = _pick_gallery(rows, max_gallery)
    items = _gallery_items(gallery, thumb_size)
    lookalikes = _lookalikes(str(out_dir), rows, thumb_size // 2)

    html = _environment().get_template("report.html.j2").render(
        out_dir=str(out_dir),
        generated_at=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        run=runs[-1],
        run_count=len(runs),
        photos=len(rows),
        status_counts=status_counts,
        with_dog=status_counts["dog"] + status_counts["dog_and_human"],
        with_human=status_counts["human"] + status_counts["dog_and_human"],
        breed_chart=_png_uri(breed_chart(rows)),
        score_histogram=_png_uri(score_histogram(rows)),
        items=items,
        decoded=int(rows["status"].isin(IMAGE_STATUSES).sum()),
        statuses=[s for s in IMAGE_STATUSES if any(i["status"] == s for i in items)],
        breeds=sorted({i["breed"] for i in items if i["breed"]}),
        problems=[{"path": r["path"], "status": r["status"], "reason": _get(r, "error") or ""}
                  for r in problems.head(max_errors).to_dict("records")],
        problem_count=len(problems),
        lookalikes=lookalikes,
    )
    with replacing(html_path, parents=True) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return html_path
