"""Loss curves as SVG, drawn with the standard library alone: one line per measured series (training
and validation loss, or accuracy, or a reward margin) against optimizer steps, with the tokens seen
along the top axis. A browser shows the file, and a README can embed it.

    write_loss_svg("out/pretrain/loss.svg", [{"step": 0, "val_loss": 10.9, "tokens_seen": 0}, ...])

Each record is one evaluation, as the stages write them to metrics.jsonl; a series is drawn through
the records that hold a finite value for it, and every such value is one marked point.
"""
import dataclasses
import math
from pathlib import Path
from xml.sax.saxutils import escape

from common import atomic_write

WIDTH, HEIGHT = 860, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 160, 60, 50  # margins around the plot area, in pixels; the legend is at the right
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")
LOSSES = (("train_loss", "training loss"), ("val_loss", "validation loss"))


def nice_ticks(low: float, high: float, count: int = 5, whole: bool = False) -> list[float]:
    """About `count` round values (steps of 1, 2 or 5 times a power of ten) covering [low, high];
    whole: steps of at least 1 (steps and epochs come in whole numbers)."""
    if high <= low:
        high = low + 1
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    if whole:
        step = max(step, 1)
    first = math.floor(low / step) * step
    return [first + i * step for i in range(int(math.ceil((high - first) / step - 1e-9)) + 1)]


def _label(value: float) -> str:
    """A tick's text: 12k and 3.4M for large counts, up to four significant digits otherwise."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.4g}{suffix}"
    return f"{value:.4g}"


@dataclasses.dataclass
class Frame:
    """The plot area: data ranges [x0, x1] x [y0, y1] mapped onto the pixels inside the margins."""
    x0: float
    x1: float
    y0: float
    y1: float
    width: int = WIDTH - LEFT - RIGHT
    height: int = HEIGHT - TOP - BOTTOM

    def sx(self, v: float) -> float:
        return LEFT + (v - self.x0) / (self.x1 - self.x0) * self.width

    def sy(self, v: float) -> float:  # SVG's y grows downwards
        return TOP + self.height - (v - self.y0) / (self.y1 - self.y0) * self.height


def write_loss_svg(path: str | Path, records: list[dict], *, series: tuple[tuple[str, str], ...] = LOSSES,
                   title: str = "loss", x: str = "step", top_x: str | None = "tokens_seen") -> Path:
    """Draw `series` ((record key, legend text) pairs) of the records against record[x] into an SVG at
    path, written atomically; top_x labels the top axis (tokens seen) where the records give it."""
    points = {key: [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float))
                    and math.isfinite(r[key]) and x in r] for key, _ in series}
    xs = [px for line in points.values() for px, _ in line] or [0]
    ys = [py for line in points.values() for _, py in line] or [0]
    x_ticks = nice_ticks(min(xs), max(xs), whole=all(float(v).is_integer() for v in xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    frame = Frame(x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1])
    sx, sy, plot_w, plot_h = frame.sx, frame.sy, frame.width, frame.height
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{LEFT}" y="20" font-size="14">{escape(title)}</text>',
           f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#888"/>']
    for v in x_ticks:
        out.append(f'<line x1="{sx(v):.1f}" y1="{TOP}" x2="{sx(v):.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        out.append(f'<text x="{sx(v):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{_label(v)}</text>')
    for v in y_ticks:
        out.append(f'<line x1="{LEFT}" y1="{sy(v):.1f}" x2="{LEFT + plot_w}" y2="{sy(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{_label(v)}</text>')
    out.append(f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x)}</text>')
    out += _top_axis(records, x, top_x, x_ticks, frame)
    for i, (key, legend) in enumerate(series):
        color = COLORS[i % len(COLORS)]
        line = " ".join(f"{sx(px):.1f},{sy(py):.1f}" for px, py in points[key])
        out.append(f'<g class="series" data-key="{escape(key)}" stroke="{color}" fill="{color}">')
        if len(points[key]) > 1:
            out.append(f'<polyline points="{line}" fill="none" stroke-width="1.5"/>')
        out += [f'<circle cx="{sx(px):.1f}" cy="{sy(py):.1f}" r="2.5"><title>{escape(key)} {py:.4g} at '
                f'{escape(x)} {px:g}</title></circle>' for px, py in points[key]]
        out.append("</g>")
        legend_y = TOP + 10 + 18 * i  # beside the plot, where no line can run through it
        out.append(f'<line x1="{LEFT + plot_w + 12}" y1="{legend_y - 4}" x2="{LEFT + plot_w + 30}" y2="{legend_y - 4}" '
                   f'stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="{LEFT + plot_w + 36}" y="{legend_y}" fill="{color}">{escape(legend)}</text>')
    out.append("</svg>")
    return atomic_write(path, "\n".join(out) + "\n")


def _top_axis(records: list[dict], x: str, top_x: str | None, x_ticks: list[float], frame: Frame) -> list[str]:
    """The top axis's labels: top_x at each x tick, interpolated between the records that give both."""
    known = sorted((r[x], r[top_x]) for r in records if top_x and x in r and r.get(top_x) is not None)
    if len(known) < 2 or known[-1][0] == known[0][0]:
        return []
    (xa, ta), (xb, tb) = known[0], known[-1]  # tokens grow linearly with steps: the batch is fixed
    out = [f'<text x="{LEFT + frame.width / 2}" y="{TOP - 24}" text-anchor="middle">'
           f'{escape(top_x.replace("_", " "))}</text>']
    for v in x_ticks:
        top = ta + (v - xa) * (tb - ta) / (xb - xa)
        out.append(f'<text x="{frame.sx(v):.1f}" y="{TOP - 6}" text-anchor="middle">{_label(top)}</text>')
    return out
