// learningRate against the formulas written out directly (per phase), plus shape properties.
import { describe, expect, it } from 'vitest';
import { ArgumentError } from '../../lib/errors.js';
import { DEFAULT_MIN_LR_RATIO, learningRate, validateSchedule, type LrSchedule } from '../../lib/train/schedule.js';

/** Independent formulation: piecewise, written from the spec, with the cosine as a half-period of sin^2. */
function expected(s: LrSchedule, t: number): number {
  const P = s.peakLr;
  const m = (s.minLrRatio ?? 0.1) * P;
  if (t < s.warmupSteps) return (P / s.warmupSteps) * (t + 1);
  if ((s.kind ?? 'cosine') === 'constant') return P;
  if (t >= s.totalSteps) return m;
  const frac = (t - s.warmupSteps) / (s.totalSteps - s.warmupSteps);
  if (s.kind === 'linear') return m + (P - m) * (1 - frac);
  // (1 + cos(pi f)) / 2 = cos^2(pi f / 2)
  return m + (P - m) * Math.cos((Math.PI * frac) / 2) ** 2;
}

describe('learningRate', () => {
  const cases: LrSchedule[] = [
    { peakLr: 3e-4, warmupSteps: 10, totalSteps: 100 },
    { peakLr: 5e-6, warmupSteps: 2000, totalSteps: 7000, minLrRatio: 0.01 },
    { peakLr: 1, warmupSteps: 0, totalSteps: 50, kind: 'linear', minLrRatio: 0 },
    { peakLr: 2, warmupSteps: 5, totalSteps: 5, kind: 'cosine' },
    { peakLr: 1e-3, warmupSteps: 3, totalSteps: 20, kind: 'constant' },
    { peakLr: 1e-3, warmupSteps: 1, totalSteps: 2, minLrRatio: 1 },
  ];
  for (const s of cases) {
    it(`matches the direct formulas for ${JSON.stringify(s)}`, () => {
      for (let t = 0; t < s.totalSteps + 10; t++) {
        const got = learningRate(s, t);
        expect(Math.abs(got - expected(s, t))).toBeLessThanOrEqual(1e-12 * s.peakLr);
      }
    });
  }

  it('has the documented landmarks', () => {
    const s: LrSchedule = { peakLr: 1, warmupSteps: 4, totalSteps: 14 };
    expect(learningRate(s, 0)).toBeCloseTo(0.25, 15);
    expect(learningRate(s, 3)).toBe(1);
    expect(learningRate(s, 4)).toBe(1);
    expect(learningRate(s, 9)).toBeCloseTo(DEFAULT_MIN_LR_RATIO + (1 - DEFAULT_MIN_LR_RATIO) / 2, 12); // half-way
    expect(learningRate(s, 14)).toBeCloseTo(DEFAULT_MIN_LR_RATIO, 15);
    expect(learningRate(s, 1000)).toBeCloseTo(DEFAULT_MIN_LR_RATIO, 15);
  });

  it('increases in warmup, then never increases nor falls below the floor', () => {
    for (const kind of ['cosine', 'linear'] as const) {
      const s: LrSchedule = { peakLr: 1e-3, warmupSteps: 50, totalSteps: 500, minLrRatio: 0.05, kind };
      let prev = 0;
      for (let t = 0; t < 600; t++) {
        const lr = learningRate(s, t);
        if (t < 50) expect(lr).toBeGreaterThan(prev);
        else expect(lr).toBeLessThanOrEqual(prev);
        if (t >= 50) expect(lr).toBeGreaterThanOrEqual(0.05 * 1e-3 - 1e-18);
        prev = lr;
      }
    }
  });

  it('rejects bad schedules naming the field, and bad steps', () => {
    const base: LrSchedule = { peakLr: 1, warmupSteps: 2, totalSteps: 10 };
    const bad: [Partial<LrSchedule>, string][] = [
      [{ peakLr: 0 }, 'peakLr'],
      [{ peakLr: NaN }, 'peakLr'],
      [{ peakLr: Infinity }, 'peakLr'],
      [{ warmupSteps: -1 }, 'warmupSteps'],
      [{ warmupSteps: 1.5 }, 'warmupSteps'],
      [{ totalSteps: 1 }, 'totalSteps'],
      [{ warmupSteps: 0, totalSteps: 0 }, 'totalSteps'],
      [{ minLrRatio: 1.5 }, 'minLrRatio'],
      [{ minLrRatio: NaN }, 'minLrRatio'],
      [{ kind: 'step' as never }, 'kind'],
    ];
    for (const [patch, field] of bad) {
      expect(() => learningRate({ ...base, ...patch }, 0)).toThrow(ArgumentError);
      expect(() => validateSchedule({ ...base, ...patch })).toThrow(new RegExp(`LrSchedule\\.${field} `));
    }
    expect(() => learningRate(base, -1)).toThrow(/step must be an integer >= 0, got -1/);
    expect(() => learningRate(base, 0.5)).toThrow(ArgumentError);
    expect(validateSchedule(base)).toEqual({ ...base, minLrRatio: 0.1, kind: 'cosine' });
  });
});
