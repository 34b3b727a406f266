/**
 * branch-train-stitch: build a generalist LLM out of specialised experts with the Branch-Train-Stitch
 * method, on a native CPU (and CUDA) backend.
 *
 * - `ops`: the kernels (GEMM, attention, RMSNorm, RoPE, SwiGLU, embedding, cross-entropy, AdamW, the
 *   stitch mix), forward and backward, sync and async.
 * - `info()`, `setSimdLevel()`, `setThreads()`: the backend.
 * - Typed errors: `BtsError` and its subclasses.
 */
export * as ops from './ops/index.js';
export { info, setSimdLevel, setThreads, simdLevels, type SimdLevel, type BackendInfo } from './runtime.js';
export * from './errors.js';
