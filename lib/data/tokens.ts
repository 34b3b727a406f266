/**
 * Token corpora for training: text files -> token ids (with an on-disk cache), a compact binary
 * format for token streams, and a by-document train / held-out split.
 *
 * A {@link TokenCorpus} is one Int32Array of ids (documents concatenated, each optionally preceded by
 * BOS and followed by EOS) plus the start offset of every document. The loaders (./loader.ts) pack
 * that stream into fixed windows; the document starts serve the split and future document masking.
 *
 * Why it is shaped this way:
 * - Encoding is the slow part of data preparation (the BPE tokenizer runs at a few MB/s on one
 *   core), and experiments re-read the same files many times. {@link encodeFiles} therefore caches
 *   each file's tokens under a key made of the file's SHA-256, the tokenizer's SHA-256 (of its
 *   tokenizer.json form) and every option that changes the ids, so a changed file, tokenizer or
 *   option can never be served stale ids, and adding a file re-encodes only that file.
 * - The binary format is a fixed 32-byte header (validated field by field on load) followed by raw
 *   little-endian arrays, read with positional reads straight into the final typed arrays (no
 *   intermediate copy of the whole file). Ids are stored as u16 when the vocabulary fits (half the
 *   size), else i32.
 * - The split is by document so that no held-out document was ever seen, even partly, in training.
 *
 * Binary format `.btok` (all integers little-endian):
 * ```
 * [0, 8)    magic "BTSTOKEN"
 * [8, 12)   u32 version = 1
 * [12, 16)  u32 dtype of the ids: 1 = u16, 2 = i32
 * [16, 20)  u32 vocabSize (every id is < vocabSize)
 * [20, 24)  u32 docCount
 * [24, 32)  u64 tokenCount (< 2^31)
 * [32, ..)  tokenCount ids, zero-padded to a multiple of 4 bytes
 * [.., EOF) docCount i32 document start offsets (strictly increasing, the first 0)
 * ```
 *
 * Known limits: at most 2^31 - 1 tokens per corpus (Int32 offsets); encoding runs on the calling
 * thread (yielding to the event loop every ~50 ms), one file at a time; each file is read whole
 * into memory; big-endian hosts are refused.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { AbortError, ArgumentError, FormatError, ShapeError, TokenRangeError, UnsupportedFeatureError } from '../errors.js';
import { writeFileAtomicAsync } from '../formats/atomic.js';
import { Rng } from '../util/random.js';

/** A token stream made of documents. */
export interface TokenCorpus {
  /** [N] token ids in [0, vocabSize): the documents concatenated. */
  tokens: Int32Array;
  /** [nDocs] offset in `tokens` where each document starts; strictly increasing, the first 0 (empty when N = 0). */
  docStarts: Int32Array;
  /** Vocabulary size of the tokenizer that produced the ids. */
  vocabSize: number;
}

/** What {@link encodeFiles} needs from a tokenizer ({@link BpeTokenizer} has it). */
export interface CorpusTokenizer {
  readonly vocabSize: number;
  readonly eosId: number | null;
  encode(text: string, options?: { parseSpecial?: boolean }): Int32Array;
  /** Used only to fingerprint the tokenizer for the cache. */
  toTokenizerJson(): Record<string, unknown>;
}

/** Progress report of {@link encodeFiles}, after each file. */
export interface EncodeProgress {
  /** The file just finished. */
  file: string;
  /** Files finished so far, and in all. */
  filesDone: number;
  files: number;
  /** Bytes of the finished files, and of all files. */
  bytesDone: number;
  bytes: number;
  /** Tokens produced so far. */
  tokens: number;
  /** True when the file's tokens came from the cache. */
  fromCache: boolean;
}

/** Options of {@link encodeFiles}. */
export interface EncodeFilesOptions {
  /** Appended after every document; null for none. Default: the tokenizer's EOS id (none if it has none). */
  eosId?: number | null;
  /** Prepended to every document; null for none. Default null. */
  bosId?: number | null;
  /**
   * How a file is cut into documents. 'file' (default): the whole file is one document. 'line':
   * each line (without its \n or \r\n) is one. A RegExp: `text.split(re)` (use non-capturing
   * groups; e.g. /\n\s*\n/ for blank-line separated paragraphs). Whitespace-only documents are dropped.
   */
  splitOn?: RegExp | 'file' | 'line';
  /** Match the tokenizer's special tokens in the text (e.g. a literal "<|eot_id|>"). Default false: text is text. */
  parseSpecial?: boolean;
  /** Invalid UTF-8 in a file: 'error' (FormatError naming the file, the default) or 'replace' (U+FFFD). */
  invalidUtf8?: 'error' | 'replace';
  /** Directory for the per-file cache (created when missing). Default: no cache. */
  cacheDir?: string;
  /** Called after each file. */
  onProgress?: (p: EncodeProgress) => void;
  /** Aborts between documents with an AbortError. */
  signal?: AbortSignal;
}

const MAGIC = Buffer.from('BTSTOKEN', 'latin1');
const VERSION = 1;
const HEADER_BYTES = 32;
const DTYPE_U16 = 1;
const DTYPE_I32 = 2;
/** Largest token count of a corpus (offsets are Int32). */
export const MAX_CORPUS_TOKENS = 2 ** 31 - 1;
const CACHE_SCHEME = 'bts-token-cache-1';

function checkLittleEndian(what: string): void {
  if (os.endianness() !== 'LE') throw new UnsupportedFeatureError(`${what}: big-endian hosts are not supported`);
}

function optId(name: string, v: unknown, vocabSize: number): number | null {
  if (v === null || v === undefined) return null;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0 || v >= vocabSize) {
    throw new TokenRangeError(`encodeFiles: ${name} must be a token id in [0, ${vocabSize}) or null, got ${JSON.stringify(v)}`);
  }
  return v;
}

/**
 * Checks that `c` is a well-formed corpus: Int32Array fields (ArgumentError), document starts
 * (ShapeError), every id in [0, vocabSize) (TokenRangeError). Messages name `what` and the fault.
 */
export function validateCorpus(c: TokenCorpus, what = 'corpus'): void {
  if (c === null || typeof c !== 'object') throw new ArgumentError(`${what}: must be a TokenCorpus object, got ${c === null ? 'null' : typeof c}`);
  if (!(c.tokens instanceof Int32Array)) throw new ArgumentError(`${what}.tokens must be an Int32Array`);
  if (!(c.docStarts instanceof Int32Array)) throw new ArgumentError(`${what}.docStarts must be an Int32Array`);
  if (!Number.isSafeInteger(c.vocabSize) || c.vocabSize < 1) throw new ArgumentError(`${what}.vocabSize must be a positive integer, got ${c.vocabSize}`);
  const N = c.tokens.length;
  const D = c.docStarts.length;
  if (N === 0 && D !== 0) throw new ShapeError(`${what}: an empty token stream must have no documents, got ${D} docStarts`);
  if (N > 0 && (D === 0 || c.docStarts[0] !== 0)) throw new ShapeError(`${what}.docStarts must start with 0 (got ${D === 0 ? 'none' : c.docStarts[0]})`);
  for (let i = 1; i < D; i++) {
    if (!(c.docStarts[i] > c.docStarts[i - 1] && c.docStarts[i] < N)) {
      throw new ShapeError(`${what}.docStarts[${i}] = ${c.docStarts[i]} must be > docStarts[${i - 1}] = ${c.docStarts[i - 1]} and < ${N} tokens`);
    }
  }
  const V = c.vocabSize;
  for (let i = 0; i < N; i++) {
    const t = c.tokens[i];
    if (t < 0 || t >= V) throw new TokenRangeError(`${what}.tokens[${i}] = ${t} is outside [0, vocabSize ${V})`);
  }
}

/** Number of documents of a corpus. */
export function documentCount(c: TokenCorpus): number {
  return c.docStarts.length;
}

/** The token range [start, end) of document `i` of a corpus. */
export function documentRange(c: TokenCorpus, i: number): [number, number] {
  if (!Number.isSafeInteger(i) || i < 0 || i >= c.docStarts.length) throw new ArgumentError(`documentRange: document index must be in [0, ${c.docStarts.length}), got ${i}`);
  return [c.docStarts[i], i + 1 < c.docStarts.length ? c.docStarts[i + 1] : c.tokens.length];
}

/**
 * Concatenates documents (given as id arrays) into a corpus, each preceded by `bosId` and followed
 * by `eosId` when those are not null. Empty documents are skipped.
 */
export function corpusFromDocuments(docs: readonly ArrayLike<number>[], vocabSize: number, opts: { bosId?: number | null; eosId?: number | null } = {}): TokenCorpus {
  const bos = opts.bosId ?? null;
  const eos = opts.eosId ?? null;
  const extra = (bos === null ? 0 : 1) + (eos === null ? 0 : 1);
  let N = 0;
  let D = 0;
  for (const d of docs) {
    if (d.length === 0) continue;
    N += d.length + extra;
    D++;
  }
  if (N > MAX_CORPUS_TOKENS) throw new ShapeError(`corpus: ${N} tokens exceed the maximum ${MAX_CORPUS_TOKENS}`);
  const tokens = new Int32Array(N);
  const docStarts = new Int32Array(D);
  let o = 0;
  let k = 0;
  for (const d of docs) {
    if (d.length === 0) continue;
    docStarts[k++] = o;
    if (bos !== null) tokens[o++] = bos;
    if (d instanceof Int32Array) tokens.set(d, o);
    else for (let i = 0; i < d.length; i++) tokens[o + i] = d[i];
    o += d.length;
    if (eos !== null) tokens[o++] = eos;
  }
  const c = { tokens, docStarts, vocabSize };
  validateCorpus(c);
  return c;
}

/** Concatenates corpora of the same vocabulary (documents kept whole, in order). */
export function concatCorpora(parts: readonly TokenCorpus[], vocabSize?: number): TokenCorpus {
  const V = vocabSize ?? parts[0]?.vocabSize;
  if (V === undefined) throw new ArgumentError('concatCorpora: no corpora and no vocabSize given');
  let N = 0;
  let D = 0;
  for (const [i, p] of parts.entries()) {
    if (p.vocabSize !== V) throw new ArgumentError(`concatCorpora: parts[${i}].vocabSize is ${p.vocabSize}, expected ${V}`);
    N += p.tokens.length;
    D += p.docStarts.length;
  }
  if (N > MAX_CORPUS_TOKENS) throw new ShapeError(`concatCorpora: ${N} tokens exceed the maximum ${MAX_CORPUS_TOKENS}`);
  const tokens = new Int32Array(N);
  const docStarts = new Int32Array(D);
  let o = 0;
  let k = 0;
  for (const p of parts) {
    tokens.set(p.tokens, o);
    for (let i = 0; i < p.docStarts.length; i++) docStarts[k++] = p.docStarts[i] + o;
    o += p.tokens.length;
  }
  return { tokens, docStarts, vocabSize: V };
}

// ---------------------------------------------------------------------------------------------------
// Binary format

/** Options of {@link saveTokens}. */
export interface SaveTokensOptions {
  /** Id storage: 'u16' (only when vocabSize <= 65536) or 'i32'. Default: u16 when it fits. */
  dtype?: 'u16' | 'i32';
}

/** Writes a corpus in the `.btok` format (see the file comment), atomically. */
export async function saveTokens(file: string, corpus: TokenCorpus, options: SaveTokensOptions = {}): Promise<void> {
  checkLittleEndian('saveTokens');
  validateCorpus(corpus, `saveTokens(${file})`);
  const { tokens, docStarts, vocabSize } = corpus;
  const dtype = options.dtype ?? (vocabSize <= 65536 ? 'u16' : 'i32');
  if (dtype !== 'u16' && dtype !== 'i32') throw new ArgumentError(`saveTokens: dtype must be 'u16' or 'i32', got ${JSON.stringify(dtype)}`);
  if (dtype === 'u16' && vocabSize > 65536) throw new ArgumentError(`saveTokens: dtype 'u16' needs vocabSize <= 65536, got ${vocabSize}`);
  if (vocabSize > 0xffffffff) throw new ArgumentError(`saveTokens: vocabSize ${vocabSize} does not fit in 32 bits`);
  const header = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(header, 0);
  header.writeUInt32LE(VERSION, 8);
  header.writeUInt32LE(dtype === 'u16' ? DTYPE_U16 : DTYPE_I32, 12);
  header.writeUInt32LE(vocabSize, 16);
  header.writeUInt32LE(docStarts.length, 20);
  header.writeUInt32LE(tokens.length >>> 0, 24);
  header.writeUInt32LE(0, 28);
  const chunks: Uint8Array[] = [header];
  if (dtype === 'i32') {
    chunks.push(new Uint8Array(tokens.buffer, tokens.byteOffset, tokens.byteLength));
  } else {
    // Convert in slices so a huge corpus does not need a second full-size copy at once.
    const SLICE = 1 << 22;
    for (let s = 0; s < tokens.length; s += SLICE) {
      const part = Uint16Array.from(tokens.subarray(s, Math.min(tokens.length, s + SLICE)));
      chunks.push(new Uint8Array(part.buffer));
    }
    if (tokens.length % 2 === 1) chunks.push(new Uint8Array(2));
  }
  chunks.push(new Uint8Array(docStarts.buffer, docStarts.byteOffset, docStarts.byteLength));
  await writeFileAtomicAsync(file, chunks);
}

async function readFully(h: fsp.FileHandle, dst: Uint8Array, position: number, file: string): Promise<void> {
  let off = 0;
  while (off < dst.byteLength) {
    const n = Math.min(dst.byteLength - off, 1 << 26);
    const { bytesRead } = await h.read(dst, off, n, position + off);
    if (bytesRead === 0) throw new FormatError(`${file}: unexpected end of file at byte ${position + off}`);
    off += bytesRead;
  }
}

/**
 * Reads a `.btok` file written by {@link saveTokens}. Every header field, the file size, the
 * document offsets and the id range are checked; any fault is a FormatError naming the file, the
 * field, the expected and the actual value.
 */
export async function loadTokens(file: string): Promise<TokenCorpus> {
  checkLittleEndian('loadTokens');
  const h = await fsp.open(file, 'r');
  try {
    const size = (await h.stat()).size;
    if (size < HEADER_BYTES) throw new FormatError(`${file}: ${size} bytes is shorter than the ${HEADER_BYTES}-byte .btok header`);
    const header = Buffer.alloc(HEADER_BYTES);
    await readFully(h, header, 0, file);
    if (!header.subarray(0, 8).equals(MAGIC)) throw new FormatError(`${file}: bad magic ${JSON.stringify(header.subarray(0, 8).toString('latin1'))}, expected "BTSTOKEN" (not a .btok token file)`);
    const version = header.readUInt32LE(8);
    if (version !== VERSION) throw new FormatError(`${file}: .btok version ${version} is not supported (expected ${VERSION})`);
    const dtype = header.readUInt32LE(12);
    if (dtype !== DTYPE_U16 && dtype !== DTYPE_I32) throw new FormatError(`${file}: unknown dtype code ${dtype} (expected ${DTYPE_U16} = u16 or ${DTYPE_I32} = i32)`);
    const vocabSize = header.readUInt32LE(16);
    if (vocabSize < 1) throw new FormatError(`${file}: vocabSize is 0`);
    if (dtype === DTYPE_U16 && vocabSize > 65536) throw new FormatError(`${file}: dtype u16 with vocabSize ${vocabSize} > 65536`);
    const docCount = header.readUInt32LE(20);
    const count = header.readUInt32LE(24) + header.readUInt32LE(28) * 2 ** 32;
    if (count > MAX_CORPUS_TOKENS) throw new FormatError(`${file}: token count ${count} exceeds the maximum ${MAX_CORPUS_TOKENS}`);
    const elt = dtype === DTYPE_U16 ? 2 : 4;
    const idBytes = Math.ceil((count * elt) / 4) * 4;
    const expected = HEADER_BYTES + idBytes + docCount * 4;
    if (size !== expected) throw new FormatError(`${file}: file is ${size} bytes, the header (${count} ${dtype === DTYPE_U16 ? 'u16' : 'i32'} ids, ${docCount} documents) implies ${expected}`);
    const tokens = new Int32Array(count);
    if (dtype === DTYPE_I32) {
      await readFully(h, new Uint8Array(tokens.buffer), HEADER_BYTES, file);
    } else {
      const SLICE = 1 << 22;
      const tmp = new Uint16Array(Math.min(SLICE, Math.max(1, count)));
      for (let s = 0; s < count; s += SLICE) {
        const n = Math.min(SLICE, count - s);
        await readFully(h, new Uint8Array(tmp.buffer, 0, n * 2), HEADER_BYTES + s * 2, file);
        tokens.set(tmp.subarray(0, n), s);
      }
    }
    const docStarts = new Int32Array(docCount);
    await readFully(h, new Uint8Array(docStarts.buffer), HEADER_BYTES + idBytes, file);
    const corpus = { tokens, docStarts, vocabSize };
    try {
      validateCorpus(corpus, `${file}: contents`);
    } catch (e) {
      throw new FormatError((e as Error).message, { cause: e });
    }
    return corpus;
  } finally {
    await h.close();
  }
}

// ---------------------------------------------------------------------------------------------------
// Encoding text files

const tokenizerHashes = new WeakMap<object, string>();

/** SHA-256 (hex) of a tokenizer's tokenizer.json form: the cache's tokenizer fingerprint. */
export function tokenizerHash(tokenizer: CorpusTokenizer): string {
  let h = tokenizerHashes.get(tokenizer);
  if (h === undefined) {
    h = createHash('sha256').update(JSON.stringify(tokenizer.toTokenizerJson())).digest('hex');
    tokenizerHashes.set(tokenizer, h);
  }
  return h;
}

function splitSpec(s: EncodeFilesOptions['splitOn']): string {
  if (s === undefined || s === 'file') return 'file';
  if (s === 'line') return 'line';
  if (s instanceof RegExp) return `re:/${s.source}/${s.flags}`;
  throw new ArgumentError(`encodeFiles: splitOn must be 'file', 'line' or a RegExp, got ${JSON.stringify(s)}`);
}

function splitDocuments(text: string, splitOn: EncodeFilesOptions['splitOn']): string[] {
  let parts: string[];
  if (splitOn === undefined || splitOn === 'file') parts = [text];
  else if (splitOn === 'line') parts = text.split(/\r?\n/);
  else parts = text.split(splitOn as RegExp);
  return parts.filter((p) => typeof p === 'string' && /\S/u.test(p));
}

/**
 * Reads UTF-8 text files, cuts them into documents, encodes each document with `tokenizer` and
 * concatenates everything (in file order) into one corpus. See {@link EncodeFilesOptions}.
 * With `cacheDir`, each file's result is stored as `<cacheDir>/<key>.btok` and reused while the
 * file's bytes, the tokenizer and the options are unchanged (a damaged cache file is re-encoded).
 * @param tokenizer e.g. a {@link BpeTokenizer}.
 * @param files paths of UTF-8 text files (a leading BOM is dropped).
 */
export async function encodeFiles(tokenizer: CorpusTokenizer, files: readonly string[], opts: EncodeFilesOptions = {}): Promise<TokenCorpus> {
  if (!Array.isArray(files)) throw new ArgumentError(`encodeFiles: files must be an array of paths, got ${typeof files}`);
  const V = tokenizer.vocabSize;
  const eos = opts.eosId === undefined ? tokenizer.eosId : optId('eosId', opts.eosId, V);
  const bos = optId('bosId', opts.bosId, V);
  const spec = splitSpec(opts.splitOn);
  const parseSpecial = opts.parseSpecial ?? false;
  const invalid = opts.invalidUtf8 ?? 'error';
  if (invalid !== 'error' && invalid !== 'replace') throw new ArgumentError(`encodeFiles: invalidUtf8 must be 'error' or 'replace', got ${JSON.stringify(invalid)}`);
  const decoder = new TextDecoder('utf-8', { fatal: invalid === 'error' });
  const sizes: number[] = [];
  for (const [i, f] of files.entries()) {
    if (typeof f !== 'string') throw new ArgumentError(`encodeFiles: files[${i}] must be a path string, got ${typeof f}`);
    try {
      const st = await fsp.stat(f);
      if (!st.isFile()) throw new Error('not a regular file');
      sizes.push(st.size);
    } catch (e) {
      throw new ArgumentError(`encodeFiles: cannot read files[${i}] "${f}": ${(e as Error).message}`);
    }
  }
  const totalBytes = sizes.reduce((a, b) => a + b, 0);
  let keyBase: string | null = null;
  if (opts.cacheDir !== undefined) {
    await fsp.mkdir(opts.cacheDir, { recursive: true });
    keyBase = JSON.stringify([CACHE_SCHEME, tokenizerHash(tokenizer), V, spec, eos, bos, parseSpecial, invalid]);
  }
  const parts: TokenCorpus[] = [];
  let bytesDone = 0;
  let tokensSoFar = 0;
  let lastYield = performance.now();
  for (const [i, f] of files.entries()) {
    if (opts.signal?.aborted) throw new AbortError(`encodeFiles: aborted before ${f}`);
    const bytes = await fsp.readFile(f);
    let part: TokenCorpus | null = null;
    let cacheFile: string | null = null;
    if (keyBase !== null) {
      const fileHash = createHash('sha256').update(bytes).digest('hex');
      const key = createHash('sha256').update(keyBase).update(fileHash).digest('hex').slice(0, 40);
      cacheFile = path.join(opts.cacheDir!, `${key}.btok`);
      if (fs.existsSync(cacheFile)) {
        try {
          part = await loadTokens(cacheFile);
          if (part.vocabSize !== V) part = null;
        } catch {
          part = null; // damaged or foreign: re-encode and overwrite
        }
      }
    }
    const fromCache = part !== null;
    if (part === null) {
      let text: string;
      try {
        text = decoder.decode(bytes);
      } catch (e) {
        throw new FormatError(`${f}: not valid UTF-8 (pass invalidUtf8: 'replace' to substitute U+FFFD)`, { cause: e });
      }
      const docs = splitDocuments(text, opts.splitOn);
      const ids: Int32Array[] = [];
      for (const d of docs) {
        if (opts.signal?.aborted) throw new AbortError(`encodeFiles: aborted in ${f}`);
        ids.push(tokenizer.encode(d, { parseSpecial }));
        if (performance.now() - lastYield > 50) {
          await new Promise<void>((r) => setImmediate(r));
          lastYield = performance.now();
        }
      }
      part = corpusFromDocuments(ids, V, { bosId: bos, eosId: eos });
      if (cacheFile !== null) await saveTokens(cacheFile, part);
    }
    parts.push(part);
    bytesDone += sizes[i];
    tokensSoFar += part.tokens.length;
    if (tokensSoFar > MAX_CORPUS_TOKENS) throw new ShapeError(`encodeFiles: more than ${MAX_CORPUS_TOKENS} tokens after ${f}; split the files into several corpora`);
    opts.onProgress?.({ file: f, filesDone: i + 1, files: files.length, bytesDone, bytes: totalBytes, tokens: tokensSoFar, fromCache });
    if (performance.now() - lastYield > 50) {
      await new Promise<void>((r) => setImmediate(r));
      lastYield = performance.now();
    }
  }
  return concatCorpora(parts, V);
}

// ---------------------------------------------------------------------------------------------------
// Train / held-out split

/** Options of {@link splitCorpus}. */
export interface SplitOptions {
  /** Fraction of the tokens to hold out, in [0, 1). */
  heldOutFraction: number;
  /** Seed of the document order. Default 0. */
  seed?: number;
}

/** Result of {@link splitCorpus}. */
export interface CorpusSplit {
  train: TokenCorpus;
  heldOut: TokenCorpus;
  /** Indices (into the input's documents, ascending) of the held-out documents; empty for a tail split. */
  heldOutDocs: Int32Array;
}

/**
 * Splits a corpus by document: documents are taken in a seeded random order into the held-out part
 * until it holds at least `heldOutFraction` of the tokens (so it may overshoot by one document);
 * the rest is the training part. Both keep the input's document order. With a fraction > 0 and at
 * least two documents, each side gets at least one document. A corpus of a single document is split
 * by a tail instead: the last round(fraction * N) tokens (at most N - 1) are held out, as a document
 * of their own. Deterministic for a seed.
 */
export function splitCorpus(corpus: TokenCorpus, options: SplitOptions): CorpusSplit {
  validateCorpus(corpus, 'splitCorpus: corpus');
  const f = options?.heldOutFraction;
  if (typeof f !== 'number' || !(f >= 0 && f < 1)) throw new ArgumentError(`splitCorpus: heldOutFraction must be in [0, 1), got ${JSON.stringify(f)}`);
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw new ArgumentError(`splitCorpus: seed must be a safe integer, got ${seed}`);
  const { tokens, docStarts, vocabSize } = corpus;
  const N = tokens.length;
  const D = docStarts.length;
  const empty = (): TokenCorpus => ({ tokens: new Int32Array(0), docStarts: new Int32Array(0), vocabSize });
  if (f === 0 || N === 0) return { train: { tokens: tokens.slice(), docStarts: docStarts.slice(), vocabSize }, heldOut: empty(), heldOutDocs: new Int32Array(0) };
  if (D === 1) {
    const held = Math.min(N - 1, Math.round(f * N));
    const cut = N - held;
    return {
      train: { tokens: tokens.slice(0, cut), docStarts: Int32Array.of(0), vocabSize },
      heldOut: held === 0 ? empty() : { tokens: tokens.slice(cut), docStarts: Int32Array.of(0), vocabSize },
      heldOutDocs: new Int32Array(0),
    };
  }
  const order = new Rng(seed).shuffle(Int32Array.from({ length: D }, (_, i) => i));
  const isHeld = new Uint8Array(D);
  const target = f * N;
  let held = 0;
  for (let j = 0; j < D - 1 && held < target; j++) {
    const d = order[j];
    isHeld[d] = 1;
    held += (d + 1 < D ? docStarts[d + 1] : N) - docStarts[d];
  }
  const pick = (want: number): TokenCorpus => {
    const docs: Int32Array[] = [];
    for (let d = 0; d < D; d++) if (isHeld[d] === want) docs.push(tokens.subarray(docStarts[d], d + 1 < D ? docStarts[d + 1] : N));
    return corpusFromDocuments(docs, vocabSize);
  };
  const heldOutDocs: number[] = [];
  for (let d = 0; d < D; d++) if (isHeld[d]) heldOutDocs.push(d);
  return { train: pick(0), heldOut: pick(1), heldOutDocs: Int32Array.from(heldOutDocs) };
}
