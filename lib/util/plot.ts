/**
 * SVG charts with no dependencies, to open in a browser or embed in a report: line charts (loss
 * curves), heatmaps with text along the axis (the stitch-gate map: how much each model contributes
 * at each token) and grouped bar charts (benchmark comparisons).
 *
 * Why it is shaped this way: training runs on servers without a display or a plotting stack, and a
 * chart that is a plain SVG string can be written next to a checkpoint, diffed and attached to an
 * issue. Every chart is one self-contained XML document (no scripts, no external fonts or CSS);
 * hovering a heatmap cell or a bar shows its exact value through an SVG <title>.
 *
 * Text: everything the caller gives (titles, labels, series names, token texts) is escaped for XML
 * (& < > " ') and made valid XML 1.0: C0 control characters become their visible Control Pictures
 * (U+2400 block; e.g. U+0001 is shown as ␁), lone surrogates and U+FFFE/U+FFFF become U+FFFD.
 * Token labels of the heatmap additionally show whitespace (space ·, newline ↵, tab →) so that
 * " the" and "the" differ on screen.
 *
 * Numbers: NaN and ±Infinity are gaps, never errors: a line breaks there (an isolated point is
 * drawn as a dot), a heatmap cell is left blank (outlined), a bar is omitted. On a log axis values
 * <= 0 are gaps too.
 *
 * Known limits: text widths are estimated (monospace font, 0.6 em per character, 2 for wide East
 * Asian characters and emoji) rather than measured, so unusual fonts may overflow; line charts draw
 * every point (a 100k-point series makes a ~2 MB file).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { ArgumentError, ShapeError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';

// ---------------------------------------------------------------------------------------------------
// Text

/** Replaces characters XML 1.0 forbids: C0 controls (except tab, LF, CR) -> Control Pictures, lone surrogates and U+FFFE/U+FFFF -> U+FFFD. */
function xmlSafe(s: string): string {
  let out = '';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c < 0x20 && c !== 0x09 && c !== 0x0a && c !== 0x0d) out += String.fromCharCode(0x2400 + c);
    else if (c >= 0xd800 && c <= 0xdbff) {
      const d = i + 1 < s.length ? s.charCodeAt(i + 1) : 0;
      if (d >= 0xdc00 && d <= 0xdfff) {
        out += s[i] + s[i + 1];
        i++;
      } else out += '\ufffd';
    } else if ((c >= 0xdc00 && c <= 0xdfff) || c === 0xfffe || c === 0xffff) out += '\ufffd';
    else out += s[i];
  }
  return out;
}

/**
 * Escapes text for use in SVG/XML content or a quoted attribute: & < > " ' become entities, and
 * characters XML 1.0 cannot hold are replaced (see the file comment).
 */
export function escapeXml(s: string): string {
  return xmlSafe(String(s)).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&apos;' })[c]!);
}

/** A token as shown on the heatmap axis: whitespace made visible, other controls as Control Pictures. */
export function visibleToken(s: string): string {
  let out = '';
  for (const ch of s) {
    if (ch === ' ') out += '·';
    else if (ch === '\n') out += '↵';
    else if (ch === '\r') out += '␍';
    else if (ch === '\t') out += '→';
    else out += ch;
  }
  return out === '' ? '∅' : out;
}

function isWide(cp: number): boolean {
  return (
    (cp >= 0x1100 && cp <= 0x115f) ||
    (cp >= 0x2e80 && cp <= 0xa4cf) ||
    (cp >= 0xac00 && cp <= 0xd7a3) ||
    (cp >= 0xf900 && cp <= 0xfaff) ||
    (cp >= 0xfe30 && cp <= 0xfe4f) ||
    (cp >= 0xff00 && cp <= 0xff60) ||
    (cp >= 0xffe0 && cp <= 0xffe6) ||
    (cp >= 0x1f300 && cp <= 0x1faff) ||
    (cp >= 0x20000 && cp <= 0x3fffd)
  );
}

/** Display width of a string in character cells (wide characters count 2, combining marks 0). */
function cells(s: string): number {
  let n = 0;
  for (const ch of s) {
    const cp = ch.codePointAt(0)!;
    if ((cp >= 0x300 && cp <= 0x36f) || cp === 0x200d || (cp >= 0xfe00 && cp <= 0xfe0f)) continue;
    n += isWide(cp) ? 2 : 1;
  }
  return n;
}

/** Truncates to at most `max` cells, with an ellipsis. */
function truncate(s: string, max: number): string {
  if (cells(s) <= max) return s;
  let out = '';
  let n = 0;
  for (const ch of s) {
    const w = cells(ch);
    if (n + w > max - 1) break;
    out += ch;
    n += w;
  }
  return out + '…';
}

const FONT = 'font-family="ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"';
const CHAR_W = 0.6; // em per cell

function textWidth(s: string, size: number): number {
  return cells(s) * CHAR_W * size;
}

function fmtCoord(v: number): string {
  return (Math.round(v * 100) / 100).toString();
}

// ---------------------------------------------------------------------------------------------------
// Axes

/** Distinct colours (Tableau 10), used in order; series beyond 10 reuse them dashed. */
export const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f', '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];

interface Axis {
  lo: number;
  hi: number;
  ticks: number[];
  log: boolean;
  step: number;
}

function niceStep(raw: number): number {
  const e = Math.floor(Math.log10(raw));
  const f = raw / 10 ** e;
  const m = f < 1.5 ? 1 : f < 2.25 ? 2 : f < 3.5 ? 2.5 : f < 7.5 ? 5 : 10; // rounded, as Heckbert's "nice numbers"
  return m * 10 ** e;
}

/** Linear axis over [min, max] with about `count` round ticks; the domain is widened to the outer ticks. */
function linearAxis(min: number, max: number, count = 6): Axis {
  if (!Number.isFinite(min) || !Number.isFinite(max)) {
    min = 0;
    max = 1;
  }
  if (min === max) {
    const d = min === 0 ? 1 : Math.abs(min) * 0.1;
    min -= d;
    max += d;
  }
  const step = niceStep((max - min) / Math.max(1, count - 1));
  const lo = Math.floor(min / step + 1e-9) * step;
  const hi = Math.ceil(max / step - 1e-9) * step;
  const ticks: number[] = [];
  for (let k = 0; lo + k * step <= hi + step * 1e-9; k++) ticks.push(Number((lo + k * step).toPrecision(12)));
  return { lo: ticks[0], hi: ticks[ticks.length - 1], ticks, log: false, step };
}

/** Log10 axis over [min, max] (both > 0): decades, with 2 and 5 in between when there are few. */
function logAxis(min: number, max: number): Axis {
  if (!(min > 0) || !(max > 0) || !Number.isFinite(min) || !Number.isFinite(max)) {
    min = 1;
    max = 10;
  }
  let e0 = Math.floor(Math.log10(min) + 1e-12);
  let e1 = Math.ceil(Math.log10(max) - 1e-12);
  if (e1 === e0) e1 = e0 + 1;
  const decades = e1 - e0;
  const every = Math.max(1, Math.ceil(decades / 8));
  e0 = Math.floor(e0 / every) * every;
  const ticks: number[] = [];
  for (let e = e0; e <= e1; e += every) {
    ticks.push(Number((10 ** e).toPrecision(12)));
    if (decades <= 2 && e < e1) for (const m of [2, 5]) ticks.push(Number((m * 10 ** e).toPrecision(12)));
  }
  return { lo: 10 ** e0, hi: 10 ** e1, ticks, log: true, step: 0 };
}

/** Tick label: fixed decimals matching the step, or exponent form for very large / small values. */
function tickLabel(v: number, axis: Axis): string {
  if (v === 0) return '0';
  const a = Math.abs(v);
  // One format per axis: exponents throughout for a log axis reaching below 0.01 or above 1e5.
  const expo = axis.log ? axis.lo < 0.01 || axis.hi > 1e5 : a >= 1e6 || a < 1e-3;
  if (expo) {
    const s = v.toExponential(2).replace(/\.?0+e/, 'e').replace('e+', 'e');
    return s;
  }
  if (axis.log) return String(Number(v.toPrecision(6)));
  // Decimals of the step: 0.05 -> 2, 0.25 -> 2, 2.5 -> 1, 20 -> 0.
  const e = Math.floor(Math.log10(axis.step) + 1e-9);
  const half = Math.abs(axis.step / 10 ** e - 2.5) < 1e-9 ? 1 : 0;
  return v.toFixed(Math.min(10, Math.max(0, half - e)));
}

function scale(axis: Axis, v: number, p0: number, p1: number): number {
  const t = axis.log ? (Math.log10(v) - Math.log10(axis.lo)) / (Math.log10(axis.hi) - Math.log10(axis.lo)) : (v - axis.lo) / (axis.hi - axis.lo);
  return p0 + t * (p1 - p0);
}

function checkSize(fn: string, name: string, v: unknown, dflt: number): number {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 100 || v > 20000) throw new ArgumentError(`${fn}: ${name} must be a number of pixels in [100, 20000], got ${JSON.stringify(v)}`);
  return v;
}

function checkText(fn: string, name: string, v: unknown): string {
  if (v === undefined || v === null) return '';
  if (typeof v !== 'string') throw new ArgumentError(`${fn}: ${name} must be a string, got ${typeof v}`);
  return v;
}

function svgOpen(width: number, height: number): string {
  return (
    `<?xml version="1.0" encoding="UTF-8"?>\n` +
    `<svg xmlns="http://www.w3.org/2000/svg" width="${fmtCoord(width)}" height="${fmtCoord(height)}" viewBox="0 0 ${fmtCoord(width)} ${fmtCoord(height)}" ${FONT} font-size="12">\n` +
    `<rect x="0" y="0" width="${fmtCoord(width)}" height="${fmtCoord(height)}" fill="#ffffff"/>\n`
  );
}

function text(x: number, y: number, s: string, attrs = ''): string {
  return `<text x="${fmtCoord(x)}" y="${fmtCoord(y)}"${attrs ? ' ' + attrs : ''}>${escapeXml(s)}</text>\n`;
}

/** Draws both axes (grid, ticks, labels) of a plot area. */
function axesSvg(x: Axis, y: Axis, px0: number, px1: number, py0: number, py1: number, xLabel: string, yLabel: string): string {
  let s = '<g stroke="#e5e5e5" stroke-width="1">\n';
  for (const t of x.ticks) {
    const px = scale(x, t, px0, px1);
    s += `<line x1="${fmtCoord(px)}" y1="${fmtCoord(py0)}" x2="${fmtCoord(px)}" y2="${fmtCoord(py1)}"/>\n`;
  }
  for (const t of y.ticks) {
    const py = scale(y, t, py0, py1);
    s += `<line x1="${fmtCoord(px0)}" y1="${fmtCoord(py)}" x2="${fmtCoord(px1)}" y2="${fmtCoord(py)}"/>\n`;
  }
  s += '</g>\n';
  s += `<rect x="${fmtCoord(px0)}" y="${fmtCoord(py1)}" width="${fmtCoord(px1 - px0)}" height="${fmtCoord(py0 - py1)}" fill="none" stroke="#444444"/>\n`;
  s += '<g fill="#333333">\n';
  for (const t of x.ticks) s += text(scale(x, t, px0, px1), py0 + 16, tickLabel(t, x), 'text-anchor="middle"');
  for (const t of y.ticks) s += text(px0 - 6, scale(y, t, py0, py1) + 4, tickLabel(t, y), 'text-anchor="end"');
  if (xLabel) s += text((px0 + px1) / 2, py0 + 36, xLabel, 'text-anchor="middle"');
  if (yLabel) s += text(16, (py0 + py1) / 2, yLabel, `text-anchor="middle" transform="rotate(-90 16 ${fmtCoord((py0 + py1) / 2)})"`);
  s += '</g>\n';
  return s;
}

// ---------------------------------------------------------------------------------------------------
// Line chart

/** One line of a {@link lineChart}. */
export interface LineSeries {
  /** Legend text. */
  name: string;
  /** [x, y] points, drawn in the given order; a point with a non-finite coordinate breaks the line. */
  points: readonly (readonly [number, number])[];
  /** CSS colour. Default: the next colour of {@link PALETTE}. */
  color?: string;
}

/** Options of {@link lineChart}. */
export interface LineChartOptions {
  title: string;
  xLabel?: string;
  yLabel?: string;
  series: readonly LineSeries[];
  /** Logarithmic y axis (values <= 0 become gaps). Default false. */
  logY?: boolean;
  /** Width in pixels, [100, 20000]. Default 800. */
  width?: number;
  /** Height in pixels, [100, 20000]. Default 480. */
  height?: number;
}

const COLOR_RE = /^(#[0-9a-fA-F]{3,8}|[a-zA-Z]{3,20}|rgba?\([0-9., %]+\))$/;

function seriesColor(fn: string, c: string | undefined, i: number): string {
  if (c === undefined) return PALETTE[i % PALETTE.length];
  if (typeof c !== 'string' || !COLOR_RE.test(c)) throw new ArgumentError(`${fn}: series[${i}].color must be a CSS colour (#rgb, #rrggbb, a name or rgb()), got ${JSON.stringify(c)}`);
  return c;
}

/**
 * A line chart as a standalone SVG document: axes with round ticks (log10 decades with `logY`), a
 * light grid, one coloured line per series, a legend on the right. Non-finite points are gaps.
 * @returns the SVG text (UTF-8 XML).
 */
export function lineChart(o: LineChartOptions): string {
  const fn = 'lineChart';
  if (o === null || typeof o !== 'object') throw new ArgumentError(`${fn}: options must be an object`);
  if (!Array.isArray(o.series)) throw new ArgumentError(`${fn}: series must be an array of { name, points }`);
  const W = checkSize(fn, 'width', o.width, 800);
  const H = checkSize(fn, 'height', o.height, 480);
  const title = checkText(fn, 'title', o.title);
  const logY = o.logY ?? false;
  const ok = (p: readonly [number, number]): boolean => Number.isFinite(p[0]) && Number.isFinite(p[1]) && (!logY || p[1] > 0);
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  o.series.forEach((s, i) => {
    const pts: readonly (readonly [number, number])[] = s?.points;
    if (s === null || typeof s !== 'object' || !Array.isArray(pts as unknown)) throw new ArgumentError(`${fn}: series[${i}] must be { name, points: [x, y][] }`);
    checkText(fn, `series[${i}].name`, s.name);
    pts.forEach((p, j) => {
      if (!Array.isArray(p as unknown) || p.length !== 2 || typeof p[0] !== 'number' || typeof p[1] !== 'number') throw new ArgumentError(`${fn}: series[${i}].points[${j}] must be an [x, y] pair of numbers`);
      if (!ok(p)) return;
      xmin = Math.min(xmin, p[0]);
      xmax = Math.max(xmax, p[0]);
      ymin = Math.min(ymin, p[1]);
      ymax = Math.max(ymax, p[1]);
    });
  });
  const xa = linearAxis(xmin, xmax, 7);
  const ya = logY ? logAxis(ymin, ymax) : linearAxis(ymin, ymax, 6);
  const names = o.series.map((s) => truncate(s.name ?? '', 40));
  const legendW = o.series.length ? Math.max(...names.map((n) => textWidth(n, 12))) + 44 : 0;
  const yTickW = Math.max(...ya.ticks.map((t) => textWidth(tickLabel(t, ya), 12)));
  const px0 = 30 + yTickW + 8;
  const px1 = Math.max(px0 + 50, W - 16 - legendW);
  const py1 = title ? 40 : 16;
  const py0 = Math.max(py1 + 50, H - 50);
  let s = svgOpen(W, H);
  if (title) s += text(W / 2, 24, title, 'text-anchor="middle" font-size="15" font-weight="bold" fill="#222222"');
  s += axesSvg(xa, ya, px0, px1, py0, py1, checkText(fn, 'xLabel', o.xLabel), checkText(fn, 'yLabel', o.yLabel));
  o.series.forEach((ser, i) => {
    const color = seriesColor(fn, ser.color, i);
    const dash = i >= PALETTE.length ? ' stroke-dasharray="6 3"' : '';
    s += `<g stroke="${color}" fill="${color}">\n<title>${escapeXml(ser.name ?? '')}</title>\n`;
    let seg: string[] = [];
    const flush = (): void => {
      if (seg.length === 1) s += `<circle cx="${seg[0].split(' ')[0]}" cy="${seg[0].split(' ')[1]}" r="2.5" stroke="none"/>\n`;
      else if (seg.length > 1) s += `<path d="M${seg.join(' L')}" fill="none" stroke-width="1.8" stroke-linejoin="round"${dash}/>\n`;
      seg = [];
    };
    for (const p of ser.points) {
      if (!ok(p)) {
        flush();
        continue;
      }
      seg.push(`${fmtCoord(scale(xa, p[0], px0, px1))} ${fmtCoord(scale(ya, p[1], py0, py1))}`);
    }
    flush();
    s += '</g>\n';
  });
  // Legend
  let ly = py1 + 8;
  o.series.forEach((ser, i) => {
    const color = seriesColor(fn, ser.color, i);
    const lx = px1 + 14;
    const dash = i >= PALETTE.length ? ' stroke-dasharray="6 3"' : '';
    s += `<line x1="${fmtCoord(lx)}" y1="${fmtCoord(ly)}" x2="${fmtCoord(lx + 22)}" y2="${fmtCoord(ly)}" stroke="${color}" stroke-width="2.5"${dash}/>\n`;
    s += text(lx + 28, ly + 4, names[i], 'fill="#222222"');
    ly += 18;
  });
  return s + '</svg>\n';
}

// ---------------------------------------------------------------------------------------------------
// Heatmap

/** Options of {@link heatmap}. */
export interface HeatmapOptions {
  title: string;
  /** Row labels (e.g. the models: hub, experts). */
  rows: readonly string[];
  /** Column labels (e.g. the tokens of a text, as decoded strings; any Unicode). */
  columns: readonly string[];
  /** values[r][c] in [0, 1] (e.g. gate weight of model r at token c); NaN for no value (a blank cell). */
  values: readonly (readonly number[])[];
  /** Text under the chart (wrapped). */
  caption?: string;
  /** Width in pixels at which columns wrap into a new band, [100, 20000]. Default 1200. */
  width?: number;
  /** Show spaces, newlines and tabs in column labels as · ↵ →. Default true. */
  showWhitespace?: boolean;
}

// Viridis, sampled at 9 evenly spaced points (matplotlib's colormap data).
const VIRIDIS: [number, number, number][] = [
  [68, 1, 84],
  [71, 44, 122],
  [59, 81, 139],
  [44, 113, 142],
  [33, 144, 141],
  [39, 173, 129],
  [92, 200, 99],
  [170, 220, 50],
  [253, 231, 37],
];

/** Colour of a value in [0, 1] on the viridis scale (dark purple 0 -> yellow 1). */
export function viridis(v: number): string {
  const t = Math.min(1, Math.max(0, v)) * (VIRIDIS.length - 1);
  const i = Math.min(VIRIDIS.length - 2, Math.floor(t));
  const f = t - i;
  const c = VIRIDIS[i].map((a, k) => Math.round(a + (VIRIDIS[i + 1][k] - a) * f));
  return '#' + c.map((x) => x.toString(16).padStart(2, '0')).join('');
}

function wrapWords(s: string, maxCells: number): string[] {
  const lines: string[] = [];
  for (const para of s.split('\n')) {
    let line = '';
    for (const word of para.split(/\s+/)) {
      if (word === '') continue;
      const cand = line ? line + ' ' + word : word;
      if (cells(cand) > maxCells && line) {
        lines.push(line);
        line = word;
      } else line = cand;
    }
    lines.push(line);
  }
  return lines;
}

function fmtValue(v: number): string {
  return Number.isFinite(v) ? v.toFixed(3) : 'n/a';
}

/**
 * A heatmap of rows x columns values in [0, 1] with the column labels (tokens) written along the
 * top of each band: columns are laid out left to right with widths fitted to their labels and wrap
 * into a new band, like lines of text, when `width` is reached. Each cell has a tooltip
 * "row | column: value". A colour bar (viridis) and the caption follow.
 * @returns the SVG text (UTF-8 XML).
 */
export function heatmap(o: HeatmapOptions): string {
  const fn = 'heatmap';
  if (o === null || typeof o !== 'object') throw new ArgumentError(`${fn}: options must be an object`);
  if (!Array.isArray(o.rows) || !Array.isArray(o.columns) || !Array.isArray(o.values)) throw new ArgumentError(`${fn}: rows, columns and values must be arrays`);
  const R = o.rows.length;
  const C = o.columns.length;
  o.rows.forEach((r, i) => checkText(fn, `rows[${i}]`, r));
  o.columns.forEach((c, i) => checkText(fn, `columns[${i}]`, c));
  if (o.values.length !== R) throw new ShapeError(`${fn}: values must have ${R} rows (one per rows[] label), got ${o.values.length}`);
  o.values.forEach((row, r) => {
    if (!Array.isArray(row) || row.length !== C) throw new ShapeError(`${fn}: values[${r}] must have ${C} entries (one per column), got ${Array.isArray(row) ? row.length : typeof row}`);
    row.forEach((v, c) => {
      if (typeof v !== 'number') throw new ArgumentError(`${fn}: values[${r}][${c}] must be a number, got ${typeof v}`);
      if (!Number.isNaN(v) && !(v >= 0 && v <= 1)) throw new ArgumentError(`${fn}: values[${r}][${c}] must be in [0, 1] (or NaN for a gap), got ${v}`);
    });
  });
  const W = checkSize(fn, 'width', o.width, 1200);
  const title = checkText(fn, 'title', o.title);
  const caption = checkText(fn, 'caption', o.caption);
  const show = o.showWhitespace ?? true;
  const FS = 12;
  const labelW = Math.max(40, ...o.rows.map((r) => textWidth(truncate(r, 24), FS))) + 14;
  const x0 = 10 + labelW;
  const maxX = Math.max(x0 + 40, W - 10);
  const labels = o.columns.map((c) => truncate(show ? visibleToken(c) : c, 24));
  const colW = labels.map((l) => Math.max(14, textWidth(l, FS) + 6));
  const headH = 18;
  const cellH = 18;
  const bandH = headH + R * cellH + 14;
  // Lay columns out in bands.
  const bands: [number, number][] = [];
  let start = 0;
  let x = x0;
  for (let c = 0; c < C; c++) {
    if (x + colW[c] > maxX && c > start) {
      bands.push([start, c]);
      start = c;
      x = x0;
    }
    x += colW[c];
  }
  if (C > 0) bands.push([start, C]);
  const top = title ? 40 : 12;
  const captionLines = caption ? wrapWords(caption, Math.floor((W - 20) / (CHAR_W * FS))) : [];
  const H = top + bands.length * bandH + 46 + captionLines.length * 16 + 10;
  let s = svgOpen(W, H);
  if (title) s += text(W / 2, 24, title, 'text-anchor="middle" font-size="15" font-weight="bold" fill="#222222"');
  bands.forEach(([c0, c1], b) => {
    const by = top + b * bandH;
    s += '<g fill="#222222">\n';
    o.rows.forEach((r, i) => (s += text(x0 - 8, by + headH + i * cellH + 13, truncate(r, 24), 'text-anchor="end"')));
    s += '</g>\n';
    let cx = x0;
    for (let c = c0; c < c1; c++) {
      s += text(cx + colW[c] / 2, by + 13, labels[c], 'text-anchor="middle" fill="#222222" xml:space="preserve"');
      for (let r = 0; r < R; r++) {
        const v = o.values[r][c];
        const cy = by + headH + r * cellH;
        const tip = `<title>${escapeXml(`${o.rows[r]} | ${JSON.stringify(o.columns[c])}: ${fmtValue(v)}`)}</title>`;
        if (Number.isNaN(v)) {
          s += `<rect x="${fmtCoord(cx + 0.5)}" y="${fmtCoord(cy + 0.5)}" width="${fmtCoord(colW[c] - 1)}" height="${cellH - 1}" fill="none" stroke="#cccccc" stroke-dasharray="2 2">${tip}</rect>\n`;
        } else {
          s += `<rect x="${fmtCoord(cx)}" y="${fmtCoord(cy)}" width="${fmtCoord(colW[c])}" height="${cellH}" fill="${viridis(v)}">${tip}</rect>\n`;
        }
      }
      cx += colW[c];
    }
  });
  // Colour bar.
  const cbY = top + bands.length * bandH + 6;
  const cbX = x0;
  const cbW = Math.min(300, maxX - x0);
  s += '<defs><linearGradient id="bts-viridis" x1="0" y1="0" x2="1" y2="0">\n';
  VIRIDIS.forEach((_, i) => (s += `<stop offset="${fmtCoord(i / (VIRIDIS.length - 1))}" stop-color="${viridis(i / (VIRIDIS.length - 1))}"/>\n`));
  s += '</linearGradient></defs>\n';
  s += `<rect x="${fmtCoord(cbX)}" y="${fmtCoord(cbY)}" width="${fmtCoord(cbW)}" height="12" fill="url(#bts-viridis)" stroke="#444444" stroke-width="0.5"/>\n`;
  s += '<g fill="#333333">\n';
  for (const t of [0, 0.5, 1]) s += text(cbX + t * cbW, cbY + 26, String(t), 'text-anchor="middle"');
  s += '</g>\n';
  captionLines.forEach((l, i) => (s += text(10, cbY + 46 + i * 16, l, 'fill="#333333"')));
  return s + '</svg>\n';
}

// ---------------------------------------------------------------------------------------------------
// Bar chart

/** Options of {@link barChart}. */
export interface BarChartOptions {
  title: string;
  /** Groups along x (e.g. benchmarks or models). */
  categories: readonly string[];
  /** One bar per category in each group; values[i] belongs to categories[i]; NaN omits the bar. */
  series: readonly { name: string; values: readonly number[]; color?: string }[];
  yLabel?: string;
  /** Width in pixels, [100, 20000]. Default 800. */
  width?: number;
  /** Height in pixels, [100, 20000]. Default 420. */
  height?: number;
}

/**
 * A grouped bar chart as a standalone SVG document (y axis from min(0, min) to the max with round
 * ticks, a legend on the right, the exact value of each bar as its tooltip).
 * @returns the SVG text (UTF-8 XML).
 */
export function barChart(o: BarChartOptions): string {
  const fn = 'barChart';
  if (o === null || typeof o !== 'object') throw new ArgumentError(`${fn}: options must be an object`);
  if (!Array.isArray(o.categories) || !Array.isArray(o.series)) throw new ArgumentError(`${fn}: categories and series must be arrays`);
  const K = o.categories.length;
  o.categories.forEach((c, i) => checkText(fn, `categories[${i}]`, c));
  let lo = 0;
  let hi = -Infinity;
  o.series.forEach((ser, i) => {
    if (ser === null || typeof ser !== 'object' || !Array.isArray(ser.values)) throw new ArgumentError(`${fn}: series[${i}] must be { name, values: number[] }`);
    checkText(fn, `series[${i}].name`, ser.name);
    if (ser.values.length !== K) throw new ShapeError(`${fn}: series[${i}].values must have ${K} entries (one per category), got ${ser.values.length}`);
    for (const v of ser.values) {
      if (typeof v !== 'number') throw new ArgumentError(`${fn}: series[${i}].values must be numbers`);
      if (Number.isFinite(v)) {
        lo = Math.min(lo, v);
        hi = Math.max(hi, v);
      }
    }
  });
  if (hi === -Infinity) hi = 1;
  const W = checkSize(fn, 'width', o.width, 800);
  const H = checkSize(fn, 'height', o.height, 420);
  const title = checkText(fn, 'title', o.title);
  const ya = linearAxis(lo, hi, 6);
  const names = o.series.map((s) => truncate(s.name ?? '', 40));
  const legendW = o.series.length ? Math.max(...names.map((n) => textWidth(n, 12))) + 40 : 0;
  const yTickW = Math.max(...ya.ticks.map((t) => textWidth(tickLabel(t, ya), 12)));
  const px0 = 30 + yTickW + 8;
  const px1 = Math.max(px0 + 50, W - 16 - legendW);
  const py1 = title ? 40 : 16;
  const py0 = Math.max(py1 + 50, H - 50);
  let s = svgOpen(W, H);
  if (title) s += text(W / 2, 24, title, 'text-anchor="middle" font-size="15" font-weight="bold" fill="#222222"');
  // y grid and axis only (categories are labels, not ticks).
  s += '<g stroke="#e5e5e5">\n';
  for (const t of ya.ticks) s += `<line x1="${fmtCoord(px0)}" y1="${fmtCoord(scale(ya, t, py0, py1))}" x2="${fmtCoord(px1)}" y2="${fmtCoord(scale(ya, t, py0, py1))}"/>\n`;
  s += '</g>\n<g fill="#333333">\n';
  for (const t of ya.ticks) s += text(px0 - 6, scale(ya, t, py0, py1) + 4, tickLabel(t, ya), 'text-anchor="end"');
  const yLabel = checkText(fn, 'yLabel', o.yLabel);
  if (yLabel) s += text(16, (py0 + py1) / 2, yLabel, `text-anchor="middle" transform="rotate(-90 16 ${fmtCoord((py0 + py1) / 2)})"`);
  s += '</g>\n';
  const groupW = (px1 - px0) / Math.max(1, K);
  const S = Math.max(1, o.series.length);
  const barW = (groupW * 0.8) / S;
  const zero = scale(ya, 0, py0, py1);
  const maxLabel = Math.max(3, Math.floor(groupW / (CHAR_W * 12)));
  o.categories.forEach((cat, k) => {
    const gx = px0 + k * groupW + groupW * 0.1;
    o.series.forEach((ser, i) => {
      const v = ser.values[k];
      if (!Number.isFinite(v)) return;
      const y = scale(ya, v, py0, py1);
      s += `<rect x="${fmtCoord(gx + i * barW)}" y="${fmtCoord(Math.min(y, zero))}" width="${fmtCoord(Math.max(0.5, barW - 1))}" height="${fmtCoord(Math.abs(zero - y))}" fill="${seriesColor(fn, ser.color, i)}"><title>${escapeXml(`${ser.name} | ${cat}: ${v}`)}</title></rect>\n`;
    });
    s += text(px0 + (k + 0.5) * groupW, py0 + 16, truncate(cat, maxLabel), 'text-anchor="middle" fill="#333333"');
  });
  s += `<line x1="${fmtCoord(px0)}" y1="${fmtCoord(zero)}" x2="${fmtCoord(px1)}" y2="${fmtCoord(zero)}" stroke="#444444"/>\n`;
  let ly = py1 + 8;
  o.series.forEach((ser, i) => {
    const lx = px1 + 14;
    s += `<rect x="${fmtCoord(lx)}" y="${fmtCoord(ly - 6)}" width="14" height="12" fill="${seriesColor(fn, ser.color, i)}"/>\n`;
    s += text(lx + 20, ly + 4, names[i], 'fill="#222222"');
    ly += 18;
  });
  return s + '</svg>\n';
}

// ---------------------------------------------------------------------------------------------------
// Files

/**
 * Writes an SVG document atomically (temp file + rename, see ../formats/atomic.ts), creating the
 * directory when missing.
 * @param file destination path (conventionally ending in .svg).
 * @param svg the document, e.g. from {@link lineChart}.
 */
export function writeSvg(file: string, svg: string): void {
  if (typeof file !== 'string' || file === '') throw new ArgumentError(`writeSvg: file must be a non-empty path, got ${JSON.stringify(file)}`);
  if (typeof svg !== 'string' || !/^\s*(<\?xml[^>]*\?>\s*)?<svg[\s>]/.test(svg)) throw new ArgumentError(`writeSvg: svg must be an SVG document string (starting with <svg or an XML declaration), got ${typeof svg === 'string' ? JSON.stringify(svg.slice(0, 30)) : typeof svg}`);
  fs.mkdirSync(path.dirname(path.resolve(file)), { recursive: true });
  writeFileAtomic(file, svg);
}
