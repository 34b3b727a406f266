/**
 * A small seeded random generator for everything in the package that must be reproducible (weight
 * init, data order, branching): PCG32 (O'Neill, "PCG: A Family of Simple Fast Space-Efficient
 * Statistically Good Algorithms for Random Number Generation", the XSH-RR output on a 64-bit LCG),
 * kept in BigInt-free 32-bit halves so it is fast in V8. Its whole state is two numbers pairs, so
 * checkpoints store it as JSON ({@link Rng.state}) and resume bit-exactly.
 */
import { ArgumentError } from '../errors.js';

const MUL_HI = 0x5851f42d;
const MUL_LO = 0x4c957f2d;

/** Seeded PCG32 generator with uniform and normal draws. */
export class Rng {
  private hi = 0;
  private lo = 0;
  private incHi = 0;
  private incLo = 0;
  private spare: number | null = null;

  /** @param seed any safe integer; @param stream selects one of 2^31 independent sequences (default 0). */
  constructor(seed: number, stream = 0) {
    if (!Number.isSafeInteger(seed)) throw new ArgumentError(`Rng: seed must be a safe integer, got ${seed}`);
    if (!Number.isSafeInteger(stream) || stream < 0) throw new ArgumentError(`Rng: stream must be a non-negative safe integer, got ${stream}`);
    // inc = (stream << 1) | 1, split into 32-bit halves.
    this.incHi = Math.floor(stream / 2 ** 31) >>> 0;
    this.incLo = ((stream * 2) % 2 ** 32 | 1) >>> 0;
    this.step();
    this.add(Math.floor(seed / 2 ** 32) >>> 0, seed >>> 0);
    this.step();
  }

  private add(hi: number, lo: number): void {
    const l = this.lo + lo;
    this.lo = l >>> 0;
    this.hi = (this.hi + hi + (l > 0xffffffff ? 1 : 0)) >>> 0;
  }

  /** state = state * MUL + inc (mod 2^64), with 16-bit limbs to stay exact in doubles. */
  private step(): void {
    const a0 = this.lo & 0xffff, a1 = this.lo >>> 16, a2 = this.hi & 0xffff, a3 = this.hi >>> 16;
    const b0 = MUL_LO & 0xffff, b1 = MUL_LO >>> 16, b2 = MUL_HI & 0xffff, b3 = MUL_HI >>> 16;
    let c0 = a0 * b0;
    let c1 = (c0 >>> 16) + a0 * b1 + a1 * b0;
    let c2 = Math.floor(c1 / 65536) + a0 * b2 + a1 * b1 + a2 * b0;
    let c3 = Math.floor(c2 / 65536) + a0 * b3 + a1 * b2 + a2 * b1 + a3 * b0;
    c0 &= 0xffff;
    c1 = c1 % 65536;
    c2 = c2 % 65536;
    c3 = c3 % 65536;
    this.lo = ((c1 << 16) | c0) >>> 0;
    this.hi = ((c3 << 16) | c2) >>> 0;
    this.add(this.incHi, this.incLo);
  }

  /** A uniform 32-bit unsigned integer. */
  nextU32(): number {
    const oldHi = this.hi, oldLo = this.lo;
    this.step();
    // xorshifted = ((old >> 18) ^ old) >> 27, truncated to 32 bits; rot = old >> 59.
    const xHi = (oldHi >>> 18) ^ oldHi;
    const xLo = ((oldLo >>> 18) | (oldHi << 14)) ^ oldLo;
    const xorshifted = ((xLo >>> 27) | (xHi << 5)) >>> 0;
    const rot = oldHi >>> 27;
    return ((xorshifted >>> rot) | (xorshifted << ((32 - rot) & 31))) >>> 0;
  }

  /** A uniform float in [0, 1) with 53 random bits. */
  next(): number {
    return ((this.nextU32() >>> 5) * 67108864 + (this.nextU32() >>> 6)) / 9007199254740992;
  }

  /** A uniform integer in [0, n) without modulo bias. */
  int(n: number): number {
    if (!Number.isSafeInteger(n) || n <= 0) throw new ArgumentError(`Rng.int: n must be a positive integer, got ${n}`);
    if (n <= 2 ** 32) {
      const limit = 2 ** 32 - (2 ** 32 % n);
      for (;;) {
        const x = this.nextU32();
        if (x < limit) return x % n;
      }
    }
    return Math.floor(this.next() * n);
  }

  /** A standard normal draw (Box-Muller, the second value kept for the next call). */
  normal(): number {
    if (this.spare !== null) {
      const s = this.spare;
      this.spare = null;
      return s;
    }
    let u = 0;
    while (u === 0) u = this.next();
    const v = this.next();
    const r = Math.sqrt(-2 * Math.log(u));
    this.spare = r * Math.sin(2 * Math.PI * v);
    return r * Math.cos(2 * Math.PI * v);
  }

  /** Fills `out` with N(0, std^2) draws. */
  fillNormal(out: Float32Array, std: number): Float32Array {
    for (let i = 0; i < out.length; i++) out[i] = this.normal() * std;
    return out;
  }

  /** In-place Fisher-Yates shuffle. */
  shuffle<T extends { length: number; [i: number]: unknown }>(a: T): T {
    for (let i = a.length - 1; i > 0; i--) {
      const j = this.int(i + 1);
      const t = a[i];
      a[i] = a[j];
      a[j] = t;
    }
    return a;
  }

  /** The full state, for checkpoints. */
  state(): RngState {
    return { hi: this.hi, lo: this.lo, incHi: this.incHi, incLo: this.incLo, spare: this.spare };
  }

  /** A generator continuing exactly from a saved {@link state}. */
  static restore(s: RngState): Rng {
    const r = new Rng(0);
    for (const k of ['hi', 'lo', 'incHi', 'incLo'] as const) {
      if (!Number.isInteger(s?.[k]) || s[k] < 0 || s[k] > 0xffffffff) throw new ArgumentError(`Rng.restore: bad state field ${k}`);
    }
    r.hi = s.hi;
    r.lo = s.lo;
    r.incHi = s.incHi;
    r.incLo = s.incLo;
    r.spare = typeof s.spare === 'number' ? s.spare : null;
    return r;
  }
}

/** JSON-serialisable state of an {@link Rng}. */
export interface RngState {
  hi: number;
  lo: number;
  incHi: number;
  incLo: number;
  spare: number | null;
}
