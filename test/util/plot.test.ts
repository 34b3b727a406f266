// SVG charts: every output parsed by a strict XML checker (test/util/xml.ts, itself tested here),
// text round-trips through escaping, NaN gaps, geometry against the data.
import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { ArgumentError, ShapeError } from '../../lib/errors.js';
import { PALETTE, barChart, escapeXml, heatmap, lineChart, viridis, visibleToken, writeSvg } from '../../lib/util/plot.js';
import { elements, parseXml, textOf, type XmlElement } from './xml.js';

const NASTY = `a<b & c>"d" 'e' \u0001\u001f 東京 🚀 é\u0301 \ud800 x\uffff`;
/** What NASTY must read as after XML decoding: controls as Control Pictures, lone surrogate and U+FFFF as U+FFFD. */
const NASTY_SHOWN = `a<b & c>"d" 'e' \u2401\u241f 東京 🚀 é\u0301 \ufffd x\ufffd`;

const texts = (root: XmlElement): string[] => elements(root).filter((e) => e.name === 'text').map(textOf);
const byName = (root: XmlElement, n: string): XmlElement[] => elements(root).filter((e) => e.name === n);

describe('XML checker (the oracle of this file)', () => {
  const bad = [
    '<svg><g></svg>',
    '<svg>a & b</svg>',
    '<svg>&nbsp;</svg>',
    '<svg x=1></svg>',
    '<svg x="1" x="2"/>',
    '<svg/><svg/>',
    '<svg>\u0001</svg>',
    '<svg>\ud800</svg>',
    '<svg a="<"/>',
    '<svg><g></g>',
    'text<svg/>',
  ];
  for (const s of bad) it(`rejects ${JSON.stringify(s)}`, () => expect(() => parseXml(s)).toThrow(/XML/));
  it('accepts and decodes a good document', () => {
    const r = parseXml('<?xml version="1.0" encoding="UTF-8"?>\n<svg a="&quot;&amp;"><t>&lt;&#65;&#x1F680;</t><e/></svg>\n');
    expect(r.attrs.a).toBe('"&');
    expect(textOf(r)).toBe('<A🚀');
  });
});

describe('escapeXml / visibleToken', () => {
  it('escapes the five specials and makes any string valid XML text that decodes back', () => {
    expect(escapeXml(`<&"'>`)).toBe('&lt;&amp;&quot;&apos;&gt;');
    expect(textOf(parseXml(`<t>${escapeXml(NASTY)}</t>`))).toBe(NASTY_SHOWN);
    expect(parseXml(`<t a="${escapeXml(NASTY)}"/>`).attrs.a).toBe(NASTY_SHOWN);
    // Every code unit, including all surrogates and controls.
    let all = '';
    for (let c = 0; c < 0x10000; c += 7) all += String.fromCharCode(c);
    expect(() => parseXml(`<t>${escapeXml(all)}</t>`)).not.toThrow();
  });
  it('shows whitespace in tokens', () => {
    expect(visibleToken(' the\n\t')).toBe('·the↵→');
    expect(visibleToken('')).toBe('∅');
  });
});

describe('lineChart', () => {
  it('is well-formed, titles and names round-trip, gaps split lines, isolated points are dots', () => {
    const svg = lineChart({
      title: NASTY,
      xLabel: 'step <x>',
      yLabel: "loss & 'nats'",
      series: [
        { name: NASTY, points: [[0, 3], [1, 2.5], [2, NaN], [3, 2], [4, 1.8], [5, Infinity], [6, 1.5], [7, NaN]] },
        { name: 'held-out', points: [[0, 3.2], [4, 2.4]] },
      ],
    });
    const root = parseXml(svg);
    expect(root.name).toBe('svg');
    expect(root.attrs.xmlns).toBe('http://www.w3.org/2000/svg');
    const t = texts(root);
    expect(t.filter((s) => s === NASTY_SHOWN).length).toBe(2); // title and legend
    expect(t).toContain('step <x>');
    expect(t).toContain("loss & 'nats'");
    const paths = byName(root, 'path');
    const circles = byName(root, 'circle');
    // series 0: [0,1] path, [3,4] path, [6] dot; series 1: one path.
    expect(paths.length).toBe(3);
    expect(circles.length).toBe(1);
    expect(paths.map((p) => p.attrs.d.split('L').length)).toEqual([2, 2, 2]);
  });

  it('maps data to the plot area: round ticks enclose the data, x and y increase the right way', () => {
    const pts: [number, number][] = [[0, 0], [10, 10]];
    const root = parseXml(lineChart({ title: 't', series: [{ name: 's', points: pts }], width: 600, height: 400 }));
    const frame = byName(root, 'rect').find((r) => r.attrs.stroke === '#444444')!;
    const [fx, fy, fw, fh] = ['x', 'y', 'width', 'height'].map((k) => Number(frame.attrs[k]));
    const d = byName(root, 'path')[0].attrs.d;
    const nums = d.replace(/[ML]/g, ' ').trim().split(/\s+/).map(Number);
    // Data range [0, 10] is exactly the tick range: first point bottom-left, last top-right of the frame.
    expect(nums[0]).toBeCloseTo(fx, 1);
    expect(nums[1]).toBeCloseTo(fy + fh, 1);
    expect(nums[2]).toBeCloseTo(fx + fw, 1);
    expect(nums[3]).toBeCloseTo(fy, 1);
    // Tick labels are evenly spaced round numbers covering the data.
    const labels = texts(root).filter((s) => /^-?[\d.]+$/.test(s)).map(Number);
    expect(labels).toContain(0);
    expect(labels).toContain(10);
  });

  it('log y: decade ticks, non-positive values are gaps', () => {
    const root = parseXml(lineChart({ title: 'lr', logY: true, series: [{ name: 'lr', points: [[0, 1e-5], [1, 1e-4], [2, 0], [3, -1], [4, 1e-3], [5, 3e-3]] }] }));
    const t = texts(root);
    for (const d of ['1e-5', '1e-4', '1e-3', '1e-2']) expect(t).toContain(d);
    const small = texts(parseXml(lineChart({ title: 'p', logY: true, series: [{ name: 'ppl', points: [[0, 3], [1, 300]] }] })));
    for (const d of ['1', '10', '100', '1000']) expect(small).toContain(d);
    expect(byName(root, 'path').length).toBe(2); // [0,1] and [4,5]
  });

  it('survives empty and all-NaN input, gives distinct colours, validates options', () => {
    expect(() => parseXml(lineChart({ title: '', series: [] }))).not.toThrow();
    expect(() => parseXml(lineChart({ title: 'x', series: [{ name: 'nan', points: [[NaN, NaN], [1, NaN]] }] }))).not.toThrow();
    expect(() => parseXml(lineChart({ title: 'one', series: [{ name: 'p', points: [[5, 5]] }] }))).not.toThrow();
    const many = lineChart({ title: 'c', series: PALETTE.map((_, i) => ({ name: `s${i}`, points: [[0, i], [1, i + 1]] as [number, number][] })) });
    const strokes = byName(parseXml(many), 'g').map((g) => g.attrs.stroke).filter((s) => s && s !== '#e5e5e5');
    expect(new Set(strokes).size).toBe(PALETTE.length);
    expect(() => lineChart({ title: 'x', series: [{ name: 'a', points: [[1, 2, 3] as never] }] })).toThrow(/points\[0\]/);
    expect(() => lineChart({ title: 'x', series: [], width: 5 })).toThrow(ArgumentError);
    expect(() => lineChart({ title: 'x', series: [{ name: 'a', points: [], color: 'red" onload="x' }] })).toThrow(/color/);
  });
});

describe('heatmap', () => {
  const tokens = ['<|begin_of_text|>', ' The', ' cat', ' &', " 'dog'", '\n', '"', '東京', '🚀', '\ud800', '\u0000', ' ', 'x'.repeat(60)];
  const rows = ['hub', 'code <expert>', 'math & co'];
  const values = rows.map((_, r) => tokens.map((_, c) => (c === 3 && r === 1 ? NaN : ((r + 1) * (c + 1)) % 7 / 6)));

  it('is well-formed, one filled cell per finite value, NaN cells blank, colours from the scale', () => {
    const svg = heatmap({ title: 'Gate map <E->H>', rows, columns: tokens, values, caption: 'mean gate weight per model & token' });
    const root = parseXml(svg);
    const cells = byName(root, 'rect').filter((r) => r.children.some((c) => typeof c !== 'string' && c.name === 'title'));
    expect(cells.length).toBe(rows.length * tokens.length);
    const blank = cells.filter((c) => c.attrs.fill === 'none');
    expect(blank.length).toBe(1);
    expect(textOf(blank[0])).toBe(`code <expert> | " &": n/a`);
    for (const c of cells) {
      const tip = textOf(c);
      const m = /\| (.*): ([\d.]+|n\/a)$/.exec(tip)!;
      expect(m).not.toBeNull();
      if (m[2] !== 'n/a') expect(c.attrs.fill).toBe(viridis(Number(m[2])));
    }
    const t = texts(root);
    for (const r of rows) expect(t).toContain(r);
    expect(t).toContain('·The');
    expect(t).toContain("·'dog'");
    expect(t).toContain('↵');
    expect(t).toContain('"');
    expect(t).toContain('東京');
    expect(t).toContain('🚀');
    expect(t).toContain('\ufffd');
    expect(t).toContain('\u2400');
    expect(t).toContain('x'.repeat(23) + '…');
    expect(t.join('\n')).toContain('mean gate weight per model & token');
  });

  it('wraps long texts into bands (row labels repeated per band), keeping every column once', () => {
    const cols = Array.from({ length: 300 }, (_, i) => ` tok${i}`);
    const vals = [cols.map((_, i) => (i % 10) / 9), cols.map(() => 0.5)];
    const root = parseXml(heatmap({ title: 'long', rows: ['hub', 'expert'], columns: cols, values: vals, width: 600 }));
    const t = texts(root);
    const bands = t.filter((s) => s === 'hub').length;
    expect(bands).toBeGreaterThan(5);
    expect(t.filter((s) => s === 'expert').length).toBe(bands);
    for (const c of cols) expect(t.filter((s) => s === visibleToken(c)).length).toBe(1);
    // No cell goes past the width.
    for (const r of byName(root, 'rect')) if (r.attrs.x && r.attrs.width) expect(Number(r.attrs.x) + Number(r.attrs.width)).toBeLessThanOrEqual(600);
  });

  it('reports bad shapes and values', () => {
    expect(() => heatmap({ title: 'x', rows: ['a'], columns: ['p', 'q'], values: [[0.5]] })).toThrow(ShapeError);
    expect(() => heatmap({ title: 'x', rows: ['a', 'b'], columns: ['p'], values: [[0.5]] })).toThrow(ShapeError);
    expect(() => heatmap({ title: 'x', rows: ['a'], columns: ['p'], values: [[1.5]] })).toThrow(/values\[0\]\[0\] must be in \[0, 1\]/);
    expect(() => heatmap({ title: 'x', rows: ['a'], columns: ['p'], values: [[Infinity]] })).toThrow(ArgumentError);
    expect(() => parseXml(heatmap({ title: 'empty', rows: [], columns: [], values: [] }))).not.toThrow();
  });
});

describe('barChart', () => {
  it('is well-formed, omits NaN bars, handles negative values', () => {
    const svg = barChart({
      title: 'Average over 8 benchmarks',
      categories: ['BTS', 'BAM <adapters>', 'seed'],
      series: [
        { name: 'general', values: [28.1, 27.3, 24.0] },
        { name: 'Δ vs seed', values: [4.1, NaN, -0.5] },
      ],
      yLabel: 'accuracy (%)',
    });
    const root = parseXml(svg);
    const bars = byName(root, 'rect').filter((r) => r.children.length > 0);
    expect(bars.length).toBe(5);
    expect(texts(root)).toContain('BAM <adapters>');
    const neg = bars.find((b) => textOf(b).endsWith('seed: -0.5'))!;
    const pos = bars.find((b) => textOf(b).endsWith('seed: 24'))!;
    // The negative bar starts at the zero line, where the positive one ends.
    expect(Number(neg.attrs.y)).toBeCloseTo(Number(pos.attrs.y) + Number(pos.attrs.height), 1);
    expect(() => barChart({ title: 'x', categories: ['a'], series: [{ name: 's', values: [1, 2] }] })).toThrow(ShapeError);
  });
});

describe('writeSvg', () => {
  it('writes atomically into a new directory and refuses non-SVG text', () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-plot-'));
    try {
      const f = path.join(dir, 'sub', 'loss.svg');
      const svg = lineChart({ title: 'loss', series: [{ name: 'train', points: [[1, 2], [2, 1]] }] });
      writeSvg(f, svg);
      expect(fs.readFileSync(f, 'utf8')).toBe(svg);
      expect(fs.readdirSync(path.dirname(f))).toEqual(['loss.svg']);
      expect(() => writeSvg(f, 'hello')).toThrow(ArgumentError);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
