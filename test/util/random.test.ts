import { describe, expect, it } from 'vitest';
import { Rng } from '../../lib/util/random.js';

/** PCG32 (XSH-RR, 64-bit LCG) written with BigInt straight from the paper's reference code. */
function pcg32Reference(seed: number, stream: number, n: number): number[] {
  const M = (1n << 64n) - 1n;
  let state = 0n;
  const inc = ((BigInt(stream) << 1n) | 1n) & M;
  const step = (): void => {
    state = (state * 6364136223846793005n + inc) & M;
  };
  step();
  state = (state + BigInt(seed)) & M;
  step();
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    const old = state;
    step();
    const xs = Number((((old >> 18n) ^ old) >> 27n) & 0xffffffffn);
    const rot = Number(old >> 59n);
    out.push(((xs >>> rot) | (xs << ((32 - rot) & 31))) >>> 0);
  }
  return out;
}

describe('Rng (PCG32)', () => {
  it('matches the BigInt reference for several seeds and streams', () => {
    for (const [seed, stream] of [[42, 54], [0, 0], [123456789, 1], [2 ** 40 + 17, 3], [7, 2 ** 31 - 1]]) {
      const r = new Rng(seed, stream);
      const got = Array.from({ length: 50 }, () => r.nextU32());
      expect(got).toEqual(pcg32Reference(seed, stream, 50));
    }
  });

  it('gives the published first output of the pcg32 demo (seed 42, stream 54)', () => {
    expect(new Rng(42, 54).nextU32()).toBe(0xa15c02b7);
  });

  it('restores its state exactly', () => {
    const a = new Rng(9, 2);
    for (let i = 0; i < 7; i++) a.normal();
    const b = Rng.restore(JSON.parse(JSON.stringify(a.state())));
    expect(Array.from({ length: 20 }, () => b.normal())).toEqual(Array.from({ length: 20 }, () => a.normal()));
  });

  it('draws unbiased integers and standard normals', () => {
    const r = new Rng(1);
    const counts = new Array(7).fill(0);
    for (let i = 0; i < 70000; i++) counts[r.int(7)]++;
    for (const c of counts) expect(Math.abs(c - 10000)).toBeLessThan(500);
    let s = 0;
    let s2 = 0;
    const n = 50000;
    for (let i = 0; i < n; i++) {
      const x = r.normal();
      s += x;
      s2 += x * x;
    }
    expect(Math.abs(s / n)).toBeLessThan(0.02);
    expect(Math.abs(s2 / n - 1)).toBeLessThan(0.03);
  });

  it('rejects bad arguments', () => {
    expect(() => new Rng(1.5)).toThrow(/seed/);
    expect(() => new Rng(1).int(0)).toThrow(/n must be/);
  });
});
