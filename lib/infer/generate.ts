/**
 * Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p, min-p, repetition
 * penalty), stop tokens and stop strings, streaming as an async iterator or a callback, an
 * AbortSignal, and several prompts at once.
 *
 * Data flow of one generated token (batch of S active sequences):
 *   tokens [S] --native decode (one call: embedding, L blocks with per-slot KV caches and positions,
 *   final norm, LM head)--> logits [S, V] --Sampler per sequence (JS)--> next ids [S]
 *   --> incremental UTF-8 decode (byte-level BPE pieces can split a character) --> text deltas.
 * Prompts are prefilled one by one into their cache slots (each prefill is a [T, D] forward), then
 * all sequences decode together, one native call per step, so the GEMMs see S rows at a time.
 *
 * The generator works on any {@link CausalDecoder}: the Llama model (lib/model/llama.ts) and the
 * stitched model (one cache per member model) both provide one.
 */
import { AbortError, ArgumentError, ShapeError, TokenRangeError } from '../errors.js';
import type { BpeTokenizer } from '../tokenizer/bpe.js';
import { Sampler, type SamplingOptions } from './sampling.js';

/** A KV cache with slots (one sequence each). */
export interface DecoderCache {
  length(slot: number): number;
  reset(slot: number): void;
  dispose(): void;
}

/** What the generator needs from a model. */
export interface CausalDecoder {
  readonly vocabSize: number;
  /** Longest sequence (prompt + generated) the model supports. */
  readonly maxPositions: number;
  readonly tokenizer: BpeTokenizer | null;
  /** End-of-sequence ids from the model config (stop tokens by default). */
  readonly eosTokenIds: readonly number[];
  /** Beginning-of-sequence id, or null. */
  readonly bosTokenId: number | null;
  createCache(slots: number, capacity: number): DecoderCache;
  /** Appends `tokens` to the slot; writes the last position's logits to out [V]. */
  prefill(cache: DecoderCache, slot: number, tokens: Int32Array, out: Float32Array): Promise<void>;
  /** Appends one token to each slot; writes logits [S, V]. */
  decode(cache: DecoderCache, slots: Int32Array, tokens: Int32Array, out: Float32Array): Promise<void>;
}

/** Options of {@link generate} and {@link streamGenerate}. */
export interface GenerateOptions extends SamplingOptions {
  /** Tokens to generate at most (per prompt). Default 128. */
  maxNewTokens?: number;
  /** Stop when one of these ids is generated (it is not part of the text). Default: the model's EOS ids. */
  stopTokens?: number[];
  /** Stop when the text contains one of these strings (the text is cut before it). Default none. */
  stopStrings?: string[];
  /** Prepend the BOS token to text prompts when the model has one. Default true. */
  addBos?: boolean;
  /** Stops generation; the promise rejects with AbortError (the iterator throws it). */
  signal?: AbortSignal;
  /** Called for every generated token, as it is generated. */
  onToken?: (token: GeneratedToken) => void;
}

/** One generated token. */
export interface GeneratedToken {
  /** Index of the prompt this token belongs to (0 for a single prompt). */
  prompt: number;
  /** Token id. */
  id: number;
  /** New text this token completes (may be '' while a multi-byte character is incomplete). */
  text: string;
}

/** The outcome for one prompt. */
export interface GenerateResult {
  /** Generated text (prompt excluded, stop token/string excluded). */
  text: string;
  /** Generated ids (stop token excluded). */
  tokens: number[];
  /** Why it ended. */
  finishReason: 'stop' | 'length';
  /** Prompt length in tokens. */
  promptTokens: number;
  /** Seconds spent prefilling all prompts, and decoding. */
  prefillSeconds: number;
  decodeSeconds: number;
  /** Generated tokens per second of decode time (all prompts together). */
  tokensPerSecond: number;
}

type Prompt = string | ArrayLike<number>;

function toIds(model: CausalDecoder, p: Prompt, addBos: boolean, index: number): Int32Array {
  let ids: Int32Array;
  if (typeof p === 'string') {
    if (!model.tokenizer) throw new ArgumentError('generate: the model has no tokenizer; pass token ids instead of text');
    const enc = model.tokenizer.encode(p);
    const bos = addBos ? model.bosTokenId ?? model.tokenizer.bosId : null;
    ids = bos !== null && bos !== undefined && enc[0] !== bos ? Int32Array.from([bos, ...enc]) : enc;
  } else {
    ids = Int32Array.from(p as ArrayLike<number>);
  }
  if (ids.length === 0) throw new ArgumentError(`generate: prompt ${index} is empty (give at least one token)`);
  for (let i = 0; i < ids.length; i++) {
    if (!Number.isInteger(ids[i]) || ids[i] < 0 || ids[i] >= model.vocabSize) throw new TokenRangeError(`generate: prompt ${index} token ${i} = ${ids[i]} is outside the vocabulary [0, ${model.vocabSize})`);
  }
  return ids;
}

interface Seq {
  ids: Int32Array;
  out: number[];
  history: number[];
  text: string;
  done: boolean;
  reason: 'stop' | 'length';
  sampler: Sampler;
  bytes: InstanceType<typeof TextDecoder>;
}

/**
 * Generates from several prompts at once, yielding tokens as they come (interleaved across prompts);
 * the iterator's return value is the result per prompt.
 */
export async function* streamGenerateBatch(model: CausalDecoder, prompts: Prompt[], options: GenerateOptions = {}): AsyncGenerator<GeneratedToken, GenerateResult[]> {
  if (!Array.isArray(prompts) || prompts.length === 0) throw new ArgumentError('generate: give at least one prompt');
  const maxNew = options.maxNewTokens ?? 128;
  if (!Number.isSafeInteger(maxNew) || maxNew < 0) throw new ArgumentError(`generate: maxNewTokens must be an integer >= 0, got ${maxNew}`);
  const stops = new Set(options.stopTokens ?? [...model.eosTokenIds, ...(model.tokenizer?.eosId != null ? [model.tokenizer.eosId] : [])]);
  const stopStrings = options.stopStrings ?? [];
  if (stopStrings.some((s) => typeof s !== 'string' || s === '')) throw new ArgumentError('generate: stopStrings must be non-empty strings');
  const addBos = options.addBos ?? true;
  const seqs: Seq[] = prompts.map((p, i) => ({
    ids: toIds(model, p, addBos, i),
    out: [],
    history: [],
    text: '',
    done: maxNew === 0,
    reason: 'length',
    sampler: new Sampler({ ...options, seed: (options.seed ?? 0) + i * 7919 }),
    bytes: new TextDecoder('utf-8', { ignoreBOM: true }),
  }));
  const longest = Math.max(...seqs.map((s) => s.ids.length));
  const capacity = Math.min(longest + maxNew, model.maxPositions);
  if (longest > model.maxPositions) throw new ShapeError(`generate: a prompt has ${longest} tokens, more than the model's ${model.maxPositions} positions`);
  const V = model.vocabSize;
  const signal = options.signal;
  const checkAbort = (): void => {
    if (signal?.aborted) throw new AbortError('generation aborted');
  };
  const cache = model.createCache(seqs.length, capacity);
  const logits = new Float32Array(seqs.length * V);
  let prefillSeconds = 0;
  let decodeSeconds = 0;
  let generated = 0;
  try {
    // Appends token `id` to sequence i; returns the token event, or null when the sequence stopped.
    const accept = (i: number, id: number): GeneratedToken | null => {
      const s = seqs[i];
      if (stops.has(id)) {
        s.done = true;
        s.reason = 'stop';
        return null;
      }
      s.out.push(id);
      s.history.push(id);
      generated++;
      let delta = model.tokenizer ? s.bytes.decode(model.tokenizer.tokenBytes(id), { stream: true }) : '';
      if (stopStrings.length && delta) {
        const before = s.text.length;
        const all = s.text + delta;
        let cut = -1;
        for (const stop of stopStrings) {
          const at = all.indexOf(stop, Math.max(0, before - stop.length + 1));
          if (at >= 0 && (cut < 0 || at < cut)) cut = at;
        }
        if (cut >= 0) {
          delta = all.slice(before, Math.max(before, cut));
          s.text = all.slice(0, cut);
          s.done = true;
          s.reason = 'stop';
          return { prompt: i, id, text: delta };
        }
      }
      s.text += delta;
      if (s.out.length >= maxNew || s.ids.length + s.out.length >= capacity) s.done = true;
      return { prompt: i, id, text: delta };
    };
    const t0 = performance.now();
    for (let i = 0; i < seqs.length; i++) {
      checkAbort();
      if (seqs[i].done) continue;
      const row = logits.subarray(i * V, (i + 1) * V);
      await model.prefill(cache, i, seqs[i].ids, row);
      seqs[i].history.push(...seqs[i].ids);
      const ev = accept(i, seqs[i].sampler.sample(row, 0, V, seqs[i].history));
      if (ev) {
        options.onToken?.(ev);
        yield ev;
      }
    }
    prefillSeconds = (performance.now() - t0) / 1000;
    const t1 = performance.now();
    for (;;) {
      checkAbort();
      const active = seqs.map((s, i) => (s.done ? -1 : i)).filter((i) => i >= 0);
      if (active.length === 0) break;
      const slots = Int32Array.from(active);
      const tokens = Int32Array.from(active.map((i) => seqs[i].out[seqs[i].out.length - 1]));
      const out = logits.subarray(0, active.length * V);
      await model.decode(cache, slots, tokens, out);
      for (let r = 0; r < active.length; r++) {
        const i = active[r];
        const ev = accept(i, seqs[i].sampler.sample(out, r * V, V, seqs[i].history));
        if (ev) {
          options.onToken?.(ev);
          yield ev;
        }
      }
    }
    decodeSeconds = (performance.now() - t1) / 1000;
  } finally {
    cache.dispose();
  }
  return seqs.map((s) => {
    const tail = s.reason === 'length' ? s.bytes.decode() : '';
    return {
      text: s.text + tail,
      tokens: s.out,
      finishReason: s.reason,
      promptTokens: s.ids.length,
      prefillSeconds,
      decodeSeconds,
      tokensPerSecond: decodeSeconds > 0 ? (generated - seqs.length) / decodeSeconds : 0,
    };
  });
}

/** Streams the tokens of one prompt; the iterator's return value is the {@link GenerateResult}. */
export async function* streamGenerate(model: CausalDecoder, prompt: Prompt, options: GenerateOptions = {}): AsyncGenerator<GeneratedToken, GenerateResult> {
  const results = yield* streamGenerateBatch(model, [prompt], options);
  return results[0];
}

/** Generates from one prompt (text or ids). */
export async function generate(model: CausalDecoder, prompt: Prompt, options: GenerateOptions = {}): Promise<GenerateResult> {
  return (await generateBatch(model, [prompt], options))[0];
}

/** Generates from several prompts at once (decoded together in one batch). */
export async function generateBatch(model: CausalDecoder, prompts: Prompt[], options: GenerateOptions = {}): Promise<GenerateResult[]> {
  const it = streamGenerateBatch(model, prompts, options);
  for (;;) {
    const r = await it.next();
    if (r.done) return r.value;
  }
}
