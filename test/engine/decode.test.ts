// KV-cached generation in the native engine: prefill then decode equal the full forward's logits at
// every position, for several slots of different lengths decoded together in one batch (in any slot
// order), and truncate / reset / capacity behave. The reference is the engine's own full forward
// (logits of [1, T] without cache), itself checked against PyTorch in golden.test.ts.
import { describe, expect, it } from 'vitest';
import { ArgumentError } from '../../lib/index.js';
import { llamaCreate, type NativeKvCache, type NativeLlama } from '../../lib/engine/native.js';
import { randIds, relErr } from '../helpers.js';
import { randomTensors, record, smallConfig } from './helpers.js';

const TOL = 1e-5; // cached vs full forward: same ops, different GEMM paths and attention splits (measured <= 1e-6)

const config = smallConfig({ numHiddenLayers: 3, ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositionEmbeddings: 16 }, ropeTheta: 500000 });
const V = config.vocabSize;

/** Full-forward logits [T, V] of one sequence. */
async function full(m: NativeLlama, seq: Int32Array): Promise<Float32Array> {
  const out = new Float32Array(seq.length * V);
  await m.logits(seq, 1, seq.length, out);
  return out;
}

function row(a: Float32Array, i: number): Float32Array {
  return a.subarray(i * V, (i + 1) * V);
}

describe('KV-cached decode', () => {
  const tensors = randomTensors(config, 31);
  const m = llamaCreate(config, record(tensors), null);
  const seqs = [randIds(20, V, 1), randIds(20, V, 2), randIds(20, V, 3), randIds(20, V, 4)];
  const prefills = [3, 9, 1, 5]; // different lengths in one decode batch

  it('prefill + batched decode of slots with different lengths equals the full forward at every position', async () => {
    const ref = await Promise.all(seqs.map((s) => full(m, s)));
    const cache = m.createCache(5, 24);
    const out = new Float32Array(V);
    // slots 4, 0, 2, 1 hold sequences 0..3 (slot 3 stays empty)
    const slotOf = [4, 0, 2, 1];
    for (let i = 0; i < 4; i++) {
      await m.prefill(cache, slotOf[i], seqs[i].slice(0, prefills[i]), out);
      expect(relErr(out, row(ref[i], prefills[i] - 1)), `prefill ${i}`).toBeLessThanOrEqual(TOL);
      expect(cache.length(slotOf[i])).toBe(prefills[i]);
    }
    const pos = [...prefills];
    const step = async (which: number[]) => {
      const slots = Int32Array.from(which, (i) => slotOf[i]);
      const toks = Int32Array.from(which, (i) => seqs[i][pos[i]]);
      const logits = new Float32Array(which.length * V);
      await m.decode(cache, slots, toks, logits);
      which.forEach((i, r) => {
        expect(relErr(row(logits, r), row(ref[i], pos[i])), `seq ${i} position ${pos[i]}`).toBeLessThanOrEqual(TOL);
        pos[i]++;
        expect(cache.length(slotOf[i])).toBe(pos[i]);
      });
    };
    await step([0, 1, 2, 3]);
    await step([3, 1, 0, 2]); // another row order
    await step([2, 0]); // a subset
    for (let s = 0; s < 5; s++) await step([1, 3, 2, 0]);
    expect(cache.length(3)).toBe(0);
    // a decode batch may mix rows of a longer prefill: prefill several more tokens into slot of seq 2
    await m.prefill(cache, slotOf[2], seqs[2].slice(pos[2], pos[2] + 4), out);
    pos[2] += 4;
    expect(relErr(out, row(ref[2], pos[2] - 1))).toBeLessThanOrEqual(TOL);
    await step([2, 1]);
    cache.dispose();
  });

  it('truncate and reset rewind a slot; capacity overflow is a typed error', async () => {
    const cache: NativeKvCache = m.createCache(2, 12);
    expect(cache.slots).toBe(2);
    expect(cache.capacity).toBe(12);
    const a = seqs[0];
    const out = new Float32Array(V);
    await m.prefill(cache, 0, a.slice(0, 8), out);
    await m.prefill(cache, 1, seqs[1].slice(0, 4), out);
    // truncate slot 0 to 5 and continue with a different token: as the full forward of that sequence
    cache.truncate(0, 5);
    expect(cache.length(0)).toBe(5);
    const alt = Int32Array.from([...a.slice(0, 5), (a[5] + 1) % V]);
    const refAlt = await full(m, alt);
    await m.decode(cache, Int32Array.of(0), alt.slice(5, 6), out);
    expect(relErr(out, row(refAlt, 5))).toBeLessThanOrEqual(TOL);
    expect(cache.length(1)).toBe(4); // the other slot is untouched
    expect(() => cache.truncate(0, 7)).toThrow(ArgumentError); // cannot grow
    expect(() => cache.truncate(0, -1)).toThrow(ArgumentError);
    // reset: a new sequence from position 0
    cache.reset(0);
    expect(cache.length(0)).toBe(0);
    const b = seqs[3].slice(0, 12);
    const refB = await full(m, b);
    await m.prefill(cache, 0, b.slice(0, 11), out);
    expect(relErr(out, row(refB, 10))).toBeLessThanOrEqual(TOL);
    await m.decode(cache, Int32Array.of(0), b.slice(11, 12), out);
    expect(relErr(out, row(refB, 11))).toBeLessThanOrEqual(TOL);
    expect(cache.length(0)).toBe(12);
    // full: one more token is refused (naming the slot and the capacity), nothing changes
    await expect(m.decode(cache, Int32Array.of(0), Int32Array.of(1), out)).rejects.toThrow(/slot 0 is full .*capacity 12/);
    await expect(m.decode(cache, Int32Array.of(1, 0), Int32Array.of(1, 1), new Float32Array(2 * V))).rejects.toThrow(ArgumentError);
    await expect(m.prefill(cache, 1, new Int32Array(9), out)).rejects.toThrow(/slot 1 holds 4 tokens; 9 more would exceed the cache capacity of 12/);
    expect(cache.length(1)).toBe(4);
    expect(cache.length(0)).toBe(12);
    cache.dispose();
  });
});
