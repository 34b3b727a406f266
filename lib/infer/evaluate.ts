/**
 * Held-out evaluation: mean next-token loss and perplexity of a model over a token stream.
 *
 * The stream is cut into non-overlapping windows of T+1 tokens (inputs = window[0..T), targets =
 * window[1..T+1)); the last partial window is evaluated too, padded with ignored targets, so every
 * token after the first is predicted exactly once. Windows run in batches of B through the model's
 * forward-only loss (no logits matrix is materialised). Loss is in nats per token; perplexity is
 * exp(loss); bits per byte are given when the caller passes the byte length of the text.
 */
import { AbortError, ArgumentError } from '../errors.js';

/** What evaluation needs from a model (the Llama model and the stitched model both have it). */
export interface LossModel {
  readonly vocabSize: number;
  loss(inputs: Int32Array, targets: Int32Array, B: number, T: number): Promise<{ lossSum: number; count: number }>;
}

/** Options of {@link evaluateTokens}. */
export interface EvaluateOptions {
  /** Window length T. Default 256. */
  seqLen?: number;
  /** Windows per batch. Default 8. */
  batchSize?: number;
  /** Evaluate at most this many windows (from the start). Default all. */
  maxWindows?: number;
  /** UTF-8 byte length of the text behind the tokens, for bits per byte. */
  textBytes?: number;
  /** Called with (windows done, total windows). */
  onProgress?: (done: number, total: number) => void;
  signal?: AbortSignal;
}

/** Result of {@link evaluateTokens}. */
export interface EvaluateResult {
  /** Mean loss, nats per predicted token. */
  loss: number;
  /** exp(loss). */
  perplexity: number;
  /** Tokens predicted. */
  tokens: number;
  /** Bits per UTF-8 byte (loss * tokens / ln 2 / bytes), when textBytes was given. */
  bitsPerByte: number | null;
  /** Seconds taken. */
  seconds: number;
}

/** Mean next-token loss and perplexity of `model` on `tokens` (see the file comment). */
export async function evaluateTokens(model: LossModel, tokens: Int32Array, options: EvaluateOptions = {}): Promise<EvaluateResult> {
  const T = options.seqLen ?? 256;
  const B = options.batchSize ?? 8;
  if (!Number.isSafeInteger(T) || T < 1) throw new ArgumentError(`evaluate: seqLen must be a positive integer, got ${T}`);
  if (!Number.isSafeInteger(B) || B < 1) throw new ArgumentError(`evaluate: batchSize must be a positive integer, got ${B}`);
  if (!(tokens instanceof Int32Array)) throw new ArgumentError('evaluate: tokens must be an Int32Array');
  if (tokens.length < 2) throw new ArgumentError(`evaluate: need at least 2 tokens, got ${tokens.length}`);
  let windows = Math.ceil((tokens.length - 1) / T);
  if (options.maxWindows !== undefined) windows = Math.min(windows, options.maxWindows);
  const t0 = performance.now();
  let sum = 0;
  let count = 0;
  const inputs = new Int32Array(B * T);
  const targets = new Int32Array(B * T);
  for (let w0 = 0; w0 < windows; w0 += B) {
    if (options.signal?.aborted) throw new AbortError('evaluation aborted');
    const nb = Math.min(B, windows - w0);
    for (let b = 0; b < nb; b++) {
      const start = (w0 + b) * T;
      for (let t = 0; t < T; t++) {
        const i = start + t;
        const has = i + 1 < tokens.length;
        inputs[b * T + t] = has ? tokens[i] : 0;
        targets[b * T + t] = has ? tokens[i + 1] : -100;
      }
    }
    const r = await model.loss(inputs.subarray(0, nb * T), targets.subarray(0, nb * T), nb, T);
    sum += r.lossSum;
    count += r.count;
    options.onProgress?.(Math.min(w0 + nb, windows), windows);
  }
  const loss = count > 0 ? sum / count : NaN;
  return {
    loss,
    perplexity: Math.exp(loss),
    tokens: count,
    bitsPerByte: options.textBytes ? (sum / Math.LN2) / options.textBytes : null,
    seconds: (performance.now() - t0) / 1000,
  };
}
