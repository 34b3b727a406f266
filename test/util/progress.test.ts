// Progress against a fake stream and a fake clock: redraw throttling on a TTY, sparse plain lines
// elsewhere, rate / ETA against the known simulated speed, and the formatters.
import { describe, expect, it } from 'vitest';
import { ArgumentError } from '../../lib/errors.js';
import { Progress, formatCount, formatDuration, formatRate, formatSI } from '../../lib/util/progress.js';

class FakeStream {
  chunks: string[] = [];
  constructor(
    public isTTY: boolean,
    public columns = 120,
  ) {}
  write(s: string): boolean {
    this.chunks.push(s);
    return true;
  }
}

function clock(): { now: () => number; set: (ms: number) => void } {
  let t = 1000;
  return { now: () => t, set: (ms: number) => (t = 1000 + ms) };
}

describe('formatters', () => {
  it('formatDuration', () => {
    const cases: [number, string][] = [
      [0, '0s'],
      [59.9, '59s'],
      [60, '1m00s'],
      [65, '1m05s'],
      [3599, '59m59s'],
      [3600 + 7 * 60 + 30, '1h07m'],
      [86400 * 3 + 3600 * 4 + 5, '3d04h'],
      [NaN, '--'],
      [Infinity, '--'],
      [-1, '--'],
    ];
    for (const [s, want] of cases) expect(formatDuration(s)).toBe(want);
  });
  it('formatSI / formatCount / formatRate', () => {
    const si: [number, string][] = [
      [0, '0'],
      [0.1234, '0.12'],
      [1, '1.00'],
      [12.34, '12.3'],
      [999, '999'],
      [999.7, '1.00k'],
      [1234, '1.23k'],
      [45_600_000, '45.6M'],
      [-2500, '-2.50k'],
    ];
    for (const [n, want] of si) expect(formatSI(n)).toBe(want);
    expect(formatCount(9999)).toBe('9999');
    expect(formatCount(12_345)).toBe('12.3k');
    expect(formatRate(1234, 'tok')).toBe('1.23k tok/s');
    expect(formatRate(0.4, 'step')).toBe('2.50 s/step');
    expect(formatRate(NaN)).toBe('-- it/s');
    expect(formatRate(0)).toBe('0 it/s');
  });
});

describe('Progress on a TTY', () => {
  it('redraws one line in place at most every 100 ms, with bar, percent, rate, ETA and extra fields', () => {
    const s = new FakeStream(true);
    const c = clock();
    const p = new Progress({ total: 1000, label: 'train', unit: 'step', stream: s, now: c.now });
    // 100 steps/s, an update every 10 ms for 5 s.
    for (let ms = 0; ms <= 5000; ms += 10) {
      c.set(ms);
      p.update(ms / 10, { loss: 2.3456789, lr: 3e-4 });
    }
    // At most one write per 100 ms (plus the first).
    expect(s.chunks.length).toBeLessThanOrEqual(5000 / 100 + 1);
    expect(s.chunks.length).toBeGreaterThanOrEqual(5000 / 100 - 1);
    for (const ch of s.chunks) {
      expect(ch.startsWith('\r')).toBe(true);
      expect(ch.endsWith('\x1b[K')).toBe(true);
      expect(ch).not.toContain('\n');
    }
    const last = s.chunks[s.chunks.length - 1];
    expect(last).toContain('50.0%');
    expect(last).toContain('[██████████░░░░░░░░░░]');
    expect(last).toContain('500/1000 step');
    expect(last).toContain('100 step/s');
    expect(last).toContain('ETA 5s'); // 500 left at 100/s
    expect(last).toContain('loss=2.346');
    expect(last).toContain('lr=3e-4');
    c.set(6000);
    p.finish();
    const fin = s.chunks[s.chunks.length - 1];
    expect(fin.endsWith('\x1b[K\n')).toBe(true);
    expect(fin).toContain('in 6s');
    const n = s.chunks.length;
    p.update(999);
    p.finish();
    expect(s.chunks.length).toBe(n);
  });

  it('follows a speed change through its sliding window, and fits the terminal width', () => {
    const s = new FakeStream(true, 40);
    const c = clock();
    const p = new Progress({ total: 1e6, label: 'tokenize', unit: 'tok', stream: s, now: c.now });
    let done = 0;
    for (let ms = 100; ms <= 60_000; ms += 100) {
      done += ms <= 30_000 ? 100 : 1000; // 1k tok/s, then 10k tok/s
      c.set(ms);
      p.update(done);
    }
    expect(p.rate()).toBeGreaterThan(9000); // the window holds only the fast phase
    expect(p.rate()).toBeLessThan(11000);
    for (const ch of s.chunks) expect(Array.from(ch.replace('\r', '').replace('\x1b[K', '')).length).toBeLessThanOrEqual(39);
  });
});

describe('Progress on a log (non-TTY)', () => {
  it('prints one plain line every intervalS seconds and a final line', () => {
    const s = new FakeStream(false);
    const c = clock();
    const p = new Progress({ total: 350, label: 'eval', stream: s, now: c.now, intervalS: 10 });
    for (let sec = 1; sec <= 35; sec++) {
      c.set(sec * 1000);
      p.update(sec * 10, { ppl: 12.5 });
    }
    p.finish();
    expect(s.chunks.length).toBe(4); // 10 s, 20 s, 30 s, final
    for (const ch of s.chunks) {
      expect(ch.endsWith('\n')).toBe(true);
      expect(ch.slice(0, -1)).not.toMatch(/[\r\n\x1b]/);
    }
    expect(s.chunks[0]).toContain('28.6%'); // 100/350
    expect(s.chunks[0]).toContain('10.0 it/s');
    expect(s.chunks[0]).toContain('elapsed 10s');
    expect(s.chunks[0]).toContain('ETA 25s');
    expect(s.chunks[0]).toContain('ppl=12.5');
    expect(s.chunks[3]).toContain('100.0%');
  });

  it('handles an unknown total and hostile label / extra text', () => {
    const s = new FakeStream(false);
    const c = clock();
    const p = new Progress({ label: 'a\nb', stream: s, now: c.now, intervalS: 1 });
    c.set(1000);
    p.update(5, { note: 'x\ny\x1b[2J' });
    expect(s.chunks[0]).not.toContain('%');
    expect(s.chunks[0]).not.toContain('ETA');
    expect(s.chunks[0].slice(0, -1)).not.toMatch(/[\n\x1b]/);
  });

  it('validates options and updates', () => {
    const s = new FakeStream(false);
    expect(() => new Progress({ label: 'x', total: -1, stream: s })).toThrow(/total/);
    expect(() => new Progress({ label: 'x', intervalS: 0, stream: s })).toThrow(/intervalS/);
    expect(() => new Progress({ label: 1 as never, stream: s })).toThrow(ArgumentError);
    expect(() => new Progress({ label: 'x', stream: {} as never })).toThrow(/write/);
    expect(() => new Progress({ label: 'x', stream: s }).update(NaN)).toThrow(/done/);
  });
});
