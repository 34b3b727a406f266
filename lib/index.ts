/**
 * branch-train-stitch: build a generalist LLM out of specialised experts with the Branch-Train-Stitch
 * method, on a native CPU (and CUDA) backend.
 *
 * - `ops`: the kernels (GEMM, attention, RMSNorm, RoPE, SwiGLU, embedding, cross-entropy, AdamW, the
 *   stitch mix), forward and backward, sync and async.
 * - `info()`, `setSimdLevel()`, `setThreads()`: the backend.
 * - Formats: safetensors (read, validate, write, sharded), Hugging Face Llama `config.json`,
 *   atomic file writes.
 * - Tokenizer: byte-level BPE (train, encode, decode, Hugging Face `tokenizer.json`).
 * - Typed errors: `BtsError` and its subclasses.
 */
export * as ops from './ops/index.js';
export { info, setSimdLevel, setThreads, simdLevels, type SimdLevel, type BackendInfo } from './runtime.js';
export * from './errors.js';
export * from './formats/safetensors.js';
export * from './formats/hf-config.js';
export { writeFileAtomic, writeFileAtomicAsync, type AtomicData } from './formats/atomic.js';
export {
  BpeTokenizer,
  loadTokenizerJson,
  loadTokenizerFile,
  trainBpe,
  type AddedToken,
  type EncodeOptions,
  type DecodeOptions,
  type LoadTokenizerOptions,
  type TrainBpeOptions,
} from './tokenizer/bpe.js';
