// Validation at the engine's boundary: bad configs, missing / unknown / wrong-length / wrong-dtype
// weights and gradients, token ids and targets out of range (naming the position), bad slots,
// capacity overflow, sequences longer than maxPositionEmbeddings, use after dispose, and calls racing
// a dispose or a pending decode. Every failure is a typed error (through the TS wrapper) or an Error
// with the same code (raw addon, where only the native checks run); the process survives them all.
import { describe, expect, it } from 'vitest';
import { ArgumentError, DTypeError, DisposedError, ShapeError, TokenRangeError, UnsupportedFeatureError, type LlamaConfig } from '../../lib/index.js';
import { llamaCreate, type NativeWeight } from '../../lib/engine/native.js';
import { native } from '../../lib/native.js';
import { randIds } from '../helpers.js';
import { nextTokenTargets, randomTensors, record, smallConfig, zeroGrads } from './helpers.js';

const config = smallConfig();
const V = config.vocabSize;
const tensors = randomTensors(config, 61);
const weights = record(tensors);
const B = 2;
const T = 5;
const ids = randIds(B * T, V, 62);
const targets = nextTokenTargets(ids, B, T);

/** The code of what fn throws (sync), or 'no error'. */
function code(fn: () => unknown): string {
  try {
    fn();
  } catch (e) {
    return String((e as { code?: string }).code);
  }
  return 'no error';
}

async function codeAsync(p: () => Promise<unknown>): Promise<string> {
  try {
    await p();
  } catch (e) {
    return String((e as { code?: string }).code);
  }
  return 'no error';
}

describe('engine validation', () => {
  it('rejects bad configs', () => {
    const bad: [Partial<LlamaConfig>, RegExp][] = [
      [{ numKeyValueHeads: 2 }, /multiple of numKeyValueHeads/],
      [{ headDim: 7 }, /headDim must be even/],
      [{ hiddenSize: 0 }, /hiddenSize/],
      [{ vocabSize: 3.5 }, /vocabSize/],
      [{ rmsNormEps: -1 }, /rmsNormEps/],
      [{ ropeTheta: 0 }, /ropeTheta/],
      [{ ropeScaling: { type: 'llama3', factor: 8, lowFreqFactor: 4, highFreqFactor: 1, originalMaxPositionEmbeddings: 16 } }, /highFreqFactor/],
    ];
    for (const [over, msg] of bad) {
      const c = smallConfig(over);
      expect(() => llamaCreate(c, record(randomTensors(smallConfig(), 1)), null), JSON.stringify(over)).toThrow(msg);
      expect(code(() => native().llamaCreate(c, weights, null)), JSON.stringify(over)).toMatch(/E_ARGUMENT|E_SHAPE/);
    }
    expect(() => llamaCreate(smallConfig({ ropeScaling: { type: 'linear', factor: 2 } }), weights, null)).toThrow(UnsupportedFeatureError);
    expect(() => llamaCreate(smallConfig({ tieWordEmbeddings: 'yes' as unknown as boolean }), weights, null)).toThrow(ArgumentError);
  });

  it('rejects missing, unknown, wrong-length and wrong-dtype weights and grads, naming the tensor', () => {
    const q = 'model.layers.1.self_attn.q_proj.weight';
    const without = { ...weights };
    delete without[q];
    expect(() => llamaCreate(config, without, null)).toThrow(new RegExp(`weight '${q}' is missing`));
    expect(code(() => native().llamaCreate(config, without, null))).toBe('E_ARGUMENT');
    const extra = { ...weights, 'model.layers.7.mlp.up_proj.weight': new Float32Array(4) };
    expect(() => llamaCreate(config, extra, null)).toThrow(ArgumentError);
    expect(code(() => native().llamaCreate(config, extra, null))).toBe('E_ARGUMENT');
    const tied = smallConfig({ tieWordEmbeddings: true });
    expect(code(() => native().llamaCreate(tied, weights, null))).toBe('E_ARGUMENT'); // lm_head.weight with tied embeddings
    const short = { ...weights, [q]: new Float32Array(tensors.get(q)!.length - 1) };
    expect(() => llamaCreate(config, short, null)).toThrow(ShapeError);
    expect(code(() => native().llamaCreate(config, short, null))).toBe('E_SHAPE');
    const ints = { ...weights, [q]: new Int32Array(tensors.get(q)!.length) as unknown as NativeWeight };
    expect(() => llamaCreate(config, ints, null)).toThrow(DTypeError);
    expect(code(() => native().llamaCreate(config, ints, null))).toBe('E_DTYPE');
    const g = zeroGrads(config);
    expect(() => llamaCreate(config, weights, { ...g, [q]: new Float32Array(3) })).toThrow(ShapeError);
    expect(code(() => native().llamaCreate(config, weights, { ...g, [q]: new Float32Array(3) }))).toBe('E_SHAPE');
    expect(code(() => native().llamaCreate(config, weights, { ...g, [q]: new Uint16Array(tensors.get(q)!.length) as unknown as Float32Array }))).toBe('E_DTYPE');
    expect(() => llamaCreate(config, weights, { nope: new Float32Array(1) })).toThrow(ArgumentError);
  });

  it('rejects token ids and targets out of range, naming the first bad position', async () => {
    const m = llamaCreate(config, weights, zeroGrads(config));
    const badIds = ids.slice();
    badIds[7] = V;
    await expect(m.forwardBackward(badIds, targets, B, T, 1)).rejects.toThrow(TokenRangeError);
    await expect(m.loss(badIds, targets, B, T, null)).rejects.toThrow(/'inputs' at position 7 is 37, outside \[0, V\) with V = 37/);
    const neg = ids.slice();
    neg[3] = -1;
    await expect(m.logits(neg, B, T, new Float32Array(B * T * V))).rejects.toThrow(/'tokens' at position 3 is -1/);
    const badT = targets.slice();
    badT[2] = -5;
    await expect(m.forwardBackward(ids, badT, B, T, 1)).rejects.toThrow(/'targets' at position 2 is -5/);
    const cache = m.createCache(2, 8);
    await expect(m.prefill(cache, 0, Int32Array.of(1, 99), new Float32Array(V))).rejects.toThrow(TokenRangeError);
    await expect(m.decode(cache, Int32Array.of(0, 1), Int32Array.of(1, -7), new Float32Array(2 * V))).rejects.toThrow(/'tokens' at position 1 is -7/);
    expect(cache.length(0)).toBe(0); // nothing appended by failed calls
    // raw addon: the native checks give the same codes
    expect(await codeAsync(() => native().llamaCreate(config, weights, null).loss(badIds, targets, B, T, null))).toBe('E_TOKEN_RANGE');
    m.dispose();
  });

  it('rejects bad shapes, slots, capacities and lengths', async () => {
    const m = llamaCreate(config, weights, zeroGrads(config));
    const out = new Float32Array(V);
    await expect(m.loss(ids, targets, B, T + 1, null)).rejects.toThrow(ShapeError);
    await expect(m.loss(ids, targets, 0, T, null)).rejects.toThrow(ArgumentError);
    await expect(m.loss(ids, targets, B, 2.5, null)).rejects.toThrow(ArgumentError);
    await expect(m.logits(ids, B, T, new Float32Array(3))).rejects.toThrow(ShapeError);
    await expect(m.forwardBackward(ids, new Float32Array(B * T) as unknown as Int32Array, B, T, 1)).rejects.toThrow(DTypeError);
    await expect(m.forwardBackward(ids, targets, B, T, NaN)).rejects.toThrow(ArgumentError);
    // longer than maxPositionEmbeddings (64)
    const long = randIds(65, V, 1);
    await expect(m.logits(long, 1, 65, new Float32Array(65 * V))).rejects.toThrow(/exceeds maxPositionEmbeddings/);
    expect(() => m.createCache(1, 65)).toThrow(/capacity must be in 1..maxPositionEmbeddings/);
    expect(() => m.createCache(0, 8)).toThrow(ArgumentError);
    const cache = m.createCache(3, 8);
    await expect(m.prefill(cache, 3, Int32Array.of(1), out)).rejects.toThrow(/slot 3 is out of range \[0, 3\)/);
    await expect(m.prefill(cache, 0, new Int32Array(0), out)).rejects.toThrow(ShapeError);
    await expect(m.prefill(cache, 0, Int32Array.of(1), new Float32Array(V - 1))).rejects.toThrow(ShapeError);
    await expect(m.decode(cache, Int32Array.of(0, 5), Int32Array.of(1, 1), new Float32Array(2 * V))).rejects.toThrow(/'slots' at position 1 is 5/);
    await expect(m.decode(cache, Int32Array.of(1, 1), Int32Array.of(1, 2), new Float32Array(2 * V))).rejects.toThrow(/slot 1 appears twice/);
    await expect(m.decode(cache, Int32Array.of(0), Int32Array.of(1, 2), new Float32Array(2 * V))).rejects.toThrow(ShapeError);
    await expect(m.prefill(cache, 2, new Int32Array(9), out)).rejects.toThrow(/exceed the cache capacity of 8/);
    expect(() => cache.length(3)).toThrow(ArgumentError);
    expect(() => cache.truncate(0, 1)).toThrow(ArgumentError);
    // a cache of another model
    const other = llamaCreate(config, weights, null);
    const foreign = other.createCache(1, 8);
    await expect(m.prefill(foreign, 0, Int32Array.of(1), out)).rejects.toThrow(/created by another model/);
    await expect(m.prefill({} as never, 0, Int32Array.of(1), out)).rejects.toThrow(ArgumentError);
    other.dispose();
    // raw addon: lengths are checked natively too
    const raw = native().llamaCreate(config, weights, null);
    expect(code(() => raw.logits(ids, B, T, new Float32Array(5)))).toBe('E_SHAPE');
    expect(code(() => raw.loss(ids.subarray(1), targets, B, T, null))).toBe('E_SHAPE');
    expect(code(() => raw.decode(raw.createCache(1, 4), Int32Array.of(0), Int32Array.of(0, 1), new Float32Array(2 * V)))).toBe('E_SHAPE');
    expect(code(() => raw.createCache(1, 1e9))).toBe('E_ARGUMENT');
    raw.dispose();
    m.dispose();
  });

  it('use after dispose is a DisposedError; dispose waits for calls in flight; a busy cache refuses', async () => {
    const g = zeroGrads(config);
    const m = llamaCreate(config, weights, g);
    const cache = m.createCache(1, 8);
    // dispose while forwardBackward runs: the call completes, later calls throw
    const p = m.forwardBackward(ids, targets, B, T, 1);
    m.dispose();
    m.dispose(); // idempotent
    await expect(p).resolves.toMatchObject({ count: 8 });
    expect(g['model.norm.weight'].some((x) => x !== 0)).toBe(true);
    await expect(m.loss(ids, targets, B, T, null)).rejects.toThrow(DisposedError);
    await expect(m.prefill(cache, 0, Int32Array.of(1), new Float32Array(V))).rejects.toThrow(/has been disposed/);
    expect(() => m.createCache(1, 4)).toThrow(DisposedError);

    const m2 = llamaCreate(config, weights, null);
    const c2 = m2.createCache(2, 8);
    const out = new Float32Array(V);
    const pending = m2.prefill(c2, 0, Int32Array.of(1, 2, 3), out);
    expect(() => c2.reset(0)).toThrow(/still pending/);
    await expect(m2.decode(c2, Int32Array.of(1), Int32Array.of(1), out)).rejects.toThrow(/still pending/);
    c2.dispose(); // deferred until the prefill settles
    await pending;
    expect(() => c2.length(0)).toThrow(DisposedError);
    await expect(m2.decode(c2, Int32Array.of(0), Int32Array.of(1), out)).rejects.toThrow(DisposedError);
    m2.dispose();
    // the process is still fine: a fresh model works
    const m3 = llamaCreate(config, weights, null);
    const r = await m3.loss(ids, targets, B, T, null);
    expect(Number.isFinite(r.lossSum)).toBe(true);
    expect(m3.workspaceBytes()).toBeGreaterThan(0);
    m3.dispose();
  });
});
