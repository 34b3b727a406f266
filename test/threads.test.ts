// Concurrency: many async ops in flight, and ops from worker threads, must give the same results as
// sequential sync calls (ops are serialised by the compute lock, so they never oversubscribe).
import { Worker } from 'node:worker_threads';
import { describe, expect, it } from 'vitest';
import { ops, info, setThreads } from '../lib/index.js';
import { nativePath } from '../lib/native.js';
import { randn } from './helpers.js';

describe('threads', () => {
  it('16 concurrent async ops equal their sync results', async () => {
    const D = 333;
    const cases = Array.from({ length: 16 }, (_, i) => ({ x: randn((i + 1) * 50 * D, i), weight: randn(D, 100 + i) }));
    const sync = cases.map((c) => ops.rmsnormForward(c).out);
    const asyncs = await Promise.all(cases.map((c) => ops.rmsnormForwardAsync(c)));
    asyncs.forEach((a, i) => expect(Buffer.from(a.out.buffer).equals(Buffer.from(sync[i].buffer))).toBe(true));
  });

  it('ops called from worker threads in the same process give identical results', async () => {
    const D = 129;
    const x = randn(400 * D, 5);
    const weight = randn(D, 6);
    const expected = ops.rmsnormForward({ x, weight }).out;
    const src = `
      const { parentPort, workerData } = require('node:worker_threads');
      const addon = require(workerData.path);
      const { x, weight, N, D } = workerData;
      let out;
      for (let r = 0; r < 20; r++) {
        out = new Float32Array(N * D);
        addon.callOp('rmsnorm_forward', [x, weight, out, null], [N, D, 1e-5]);
      }
      parentPort.postMessage(out);
    `;
    const run = () =>
      new Promise<Float32Array>((resolve, reject) => {
        const w = new Worker(src, { eval: true, workerData: { path: nativePath(), x, weight, N: 400, D } });
        w.once('message', resolve);
        w.once('error', reject);
      });
    const outs = await Promise.all([run(), run(), run(), ops.rmsnormForwardAsync({ x, weight }).then((r) => r.out)]);
    for (const o of outs) expect(Buffer.from(o.buffer).equals(Buffer.from(expected.buffer))).toBe(true);
  });

  it('results do not depend on the thread count beyond rounding, and 1 thread is exact across runs', () => {
    const D = 96;
    const x = randn(1000 * D, 9);
    const weight = randn(D, 10);
    const dout = randn(1000 * D, 11);
    const t0 = info().threads;
    const grads = [1, 2, 1].map((t) => {
      setThreads(t);
      const f = ops.rmsnormForward({ x, weight });
      return ops.rmsnormBackward({ x, weight, rstd: f.rstd, dout, dweight: new Float32Array(D) }).dweight!;
    });
    setThreads(t0);
    expect(Array.from(grads[2])).toEqual(Array.from(grads[0]));
    for (let d = 0; d < D; d++) expect(Math.abs(grads[1][d] - grads[0][d])).toBeLessThan(1e-3 * (Math.abs(grads[0][d]) + 1));
  });
});
