/**
 * Byte-level BPE tokenizer (GPT-2 / Llama 3 style): load and write Hugging Face `tokenizer.json`,
 * encode, decode, and train from text. Pure TypeScript, no dependencies. Facts:
 * /work/shared/PACKAGING.md 6.4.
 *
 * Pipeline (the same for loaded and trained tokenizers):
 * 1. added tokens (specials such as `<|begin_of_text|>`) are matched in the raw text first, longest
 *    content first, and emitted as their ids;
 * 2. the text between them is normalized (only Unicode NF* normalizers are supported), split into
 *    pre-tokens by the pre-tokenizer regexes (Llama 3: one Split regex; GPT-2: ByteLevel's own
 *    regex), each pre-token UTF-8 encoded and its bytes mapped to GPT-2's printable alphabet;
 * 3. each pre-token is merged by rank (lowest-rank adjacent pair first, leftmost on ties: the same
 *    order as HF tokenizers' heap) into model tokens; results are cached per pre-token string.
 *    With `ignore_merges` (Llama 3) a pre-token that is itself in the vocab is emitted directly.
 * Decoding maps model tokens back to bytes and decodes UTF-8 (lossy, like HF: invalid sequences
 * become U+FFFD); for any valid string `decode(encode(s)) === s` exactly.
 *
 * Training (`trainBpe`): count pre-tokens, then repeatedly merge the most frequent adjacent pair,
 * ties broken by the lexicographic (byte) order of (left, right). Pair counts are updated
 * incrementally: an index from each pair to the words that contain it, and a max-heap with lazy
 * invalidation (a popped entry whose count is stale is re-pushed with the current count). Each merge
 * costs time proportional to the words that contain the pair, not to the corpus.
 *
 * Why failures are loud: a tokenizer that silently falls back to bytes (empty merges, merges whose
 * result is not in the vocab) trains and generates garbage without any error. Those are
 * FormatErrors here; non-byte-level models (Unigram, WordPiece, SentencePiece BPE with
 * byte_fallback) are UnsupportedFeatureErrors.
 *
 * Checked against HF tokenizers (Rust, through a throwaway install outside this repo): files written by
 * `save` load there, and ids agree on ~500 samples (random Unicode, English, code). Speed, on a
 * 2-core machine that was busy with other builds: 10 MB of English + Python source trains to a 16k vocab in
 * 3-8 s; encoding runs at ~4 MB/s once the pre-token cache is warm.
 *
 * Known limits: added tokens' `single_word` and `normalized` flags are not honoured (matching is on
 * the raw text); `lstrip`/`rstrip` are. Added tokens decode to their content (HF's ByteLevel decoder
 * would byte-map content made only of alphabet characters; identical for ASCII specials). BPE
 * dropout is refused. Training runs on the calling thread, yielding to the event loop every ~50 ms.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { AbortError, ArgumentError, FormatError, TokenRangeError, UnsupportedFeatureError } from '../errors.js';
import { writeFileAtomic } from '../formats/atomic.js';
import { BYTE_TO_CHAR, CHAR_TO_BYTE, GPT2_PATTERN, LLAMA3_PATTERN, compilePattern, splitIsolated } from './pretokenize.js';

/** A token matched in raw text before pre-tokenization (HF `added_tokens`). */
export interface AddedToken {
  id: number;
  /** The literal text. */
  content: string;
  /** Special tokens can be skipped when decoding and are not matched with `parseSpecial: false`. */
  special: boolean;
  /** Absorb whitespace on the left of a match. Default false. */
  lstrip: boolean;
  /** Absorb whitespace on the right of a match. Default false. */
  rstrip: boolean;
  /** Stored and written back; not honoured when matching. */
  singleWord: boolean;
  /** Stored and written back; not honoured when matching. */
  normalized: boolean;
}

type Normalization = 'NFC' | 'NFD' | 'NFKC' | 'NFKD';

/** One pre-tokenizer stage: an Isolated regex split, optionally the ByteLevel stage's prefix space. */
interface Stage {
  re: RegExp | null;
  addPrefixSpace: boolean;
}

/** Everything a tokenizer is built from (internal; see loadTokenizerJson / trainBpe). */
interface BpeParts {
  /** Model vocab: byte-level token string -> id. */
  vocab: Map<string, number>;
  /** Merges in rank order, as byte-level strings. */
  merges: [string, string][];
  added: AddedToken[];
  ignoreMerges: boolean;
  normalizers: Normalization[];
  stages: Stage[];
  /** JSON written back by toTokenizerJson. */
  json: { normalizer: unknown; preTokenizer: unknown; decoder: unknown };
  bosToken: string | null;
  eosToken: string | null;
}

/** Largest vocabulary (ids must fit in 21 bits for the packed pair keys). */
export const MAX_VOCAB_SIZE = 1 << 21;
const PAIR = MAX_VOCAB_SIZE;
const POS = 2 ** 32;
const CACHE_LIMIT = 100_000;

/** Options of {@link BpeTokenizer.encode}. */
export interface EncodeOptions {
  /** Prepend the BOS token (when the tokenizer has one), like HF `add_special_tokens`. Default false. */
  addSpecial?: boolean;
  /** Match special added tokens in the text; false treats their text as plain text. Default true. */
  parseSpecial?: boolean;
}

/** Options of {@link BpeTokenizer.decode}. */
export interface DecodeOptions {
  /** Leave special tokens out of the text. Default false. */
  skipSpecial?: boolean;
}

const utf8 = new TextEncoder();
const utf8Decoder = new TextDecoder('utf-8', { ignoreBOM: true }); // keep a leading U+FEFF: it is text, not a mark

function escapeRegex(s: string): string {
  return s.replace(/[.*+?^${}()|[\]\\/-]/gu, '\\$&');
}

function byteLevelOf(bytes: Uint8Array): string {
  let s = '';
  for (let i = 0; i < bytes.length; i++) s += BYTE_TO_CHAR[bytes[i]];
  return s;
}

/** A growable Int32 buffer for encode output. */
class IdBuffer {
  private a: Int32Array;
  private n = 0;
  constructor(cap: number) {
    this.a = new Int32Array(cap);
  }
  private grow(min: number): void {
    const b = new Int32Array(Math.max(min, this.a.length * 2));
    b.set(this.a.subarray(0, this.n));
    this.a = b;
  }
  push1(id: number): void {
    if (this.n === this.a.length) this.grow(this.n + 1);
    this.a[this.n++] = id;
  }
  append(ids: Int32Array): void {
    if (this.n + ids.length > this.a.length) this.grow(this.n + ids.length);
    this.a.set(ids, this.n);
    this.n += ids.length;
  }
  result(): Int32Array {
    return this.a.slice(0, this.n);
  }
}

/** A loaded or trained byte-level BPE tokenizer. Immutable apart from its encode cache. */
export class BpeTokenizer {
  /** Total number of ids (model vocab and added tokens): max id + 1. */
  readonly vocabSize: number;
  /** Beginning-of-sequence id, or null. */
  readonly bosId: number | null;
  /** End-of-sequence id, or null. */
  readonly eosId: number | null;
  /** Added tokens, by id. */
  readonly addedTokens: readonly AddedToken[];

  private readonly parts: BpeParts;
  private readonly idToTok: (string | undefined)[];
  private readonly idBytes: (Uint8Array | undefined)[];
  private readonly addedById = new Map<number, AddedToken>();
  private readonly byteIds = new Int32Array(256);
  private readonly mergeRank = new Map<number, number>();
  private readonly mergeOut: Int32Array;
  private readonly cache = new Map<string, Int32Array>();
  private readonly addedRe: RegExp | null;
  private readonly addedReNoSpecial: RegExp | null;
  private readonly addedByContent = new Map<string, AddedToken>();

  /** @internal Use {@link loadTokenizerJson}, {@link loadTokenizerFile} or {@link trainBpe}. */
  constructor(parts: BpeParts, source: string) {
    this.parts = parts;
    const bad = (what: string): never => {
      throw new FormatError(`${source}: ${what}`);
    };
    let maxId = -1;
    const idToTok: (string | undefined)[] = [];
    for (const [tok, id] of parts.vocab) {
      if (!Number.isSafeInteger(id) || id < 0) bad(`model.vocab["${tok}"] must be a non-negative integer id, got ${JSON.stringify(id)}`);
      if (id >= MAX_VOCAB_SIZE) bad(`model.vocab["${tok}"] id ${id} exceeds the supported maximum ${MAX_VOCAB_SIZE - 1}`);
      if (idToTok[id] !== undefined) bad(`model.vocab: id ${id} is used by both "${idToTok[id]}" and "${tok}"`);
      idToTok[id] = tok;
      maxId = Math.max(maxId, id);
    }
    const missing: number[] = [];
    for (let b = 0; b < 256; b++) {
      const id = parts.vocab.get(BYTE_TO_CHAR[b]);
      if (id === undefined) missing.push(b);
      else this.byteIds[b] = id;
    }
    if (missing.length > 0) {
      bad(`model.vocab lacks ${missing.length} of the 256 byte-level base tokens (bytes ${missing.slice(0, 8).map((b) => `0x${b.toString(16).padStart(2, '0')} "${BYTE_TO_CHAR[b]}"`).join(', ')}${missing.length > 8 ? ', ...' : ''}); byte-level BPE needs all of them`);
    }
    if (parts.merges.length === 0) bad('model.merges is empty: a BPE tokenizer without merges would silently encode byte by byte');
    this.mergeOut = new Int32Array(parts.merges.length);
    parts.merges.forEach(([a, b], rank) => {
      const ia = parts.vocab.get(a);
      const ib = parts.vocab.get(b);
      const io = parts.vocab.get(a + b);
      if (ia === undefined || ib === undefined) bad(`model.merges[${rank}] ("${a}" "${b}"): ${ia === undefined ? `"${a}"` : `"${b}"`} is not in the vocab`);
      if (io === undefined) bad(`model.merges[${rank}] ("${a}" "${b}"): the merged token "${a + b}" is not in the vocab`);
      const key = ia! * PAIR + ib!;
      if (!this.mergeRank.has(key)) this.mergeRank.set(key, rank); // HF keeps the first occurrence's rank
      this.mergeOut[rank] = io!;
    });
    for (const t of parts.added) {
      if (!Number.isSafeInteger(t.id) || t.id < 0 || t.id >= MAX_VOCAB_SIZE) bad(`added_tokens: id ${JSON.stringify(t.id)} of "${t.content}" is not a valid id`);
      if (typeof t.content !== 'string' || t.content === '') bad(`added_tokens: id ${t.id} has empty content`);
      this.addedById.set(t.id, t);
      if (!this.addedByContent.has(t.content)) this.addedByContent.set(t.content, t);
      idToTok[t.id] = t.content;
      maxId = Math.max(maxId, t.id);
    }
    this.idToTok = idToTok;
    this.idBytes = new Array(maxId + 1);
    this.vocabSize = maxId + 1;
    this.addedTokens = [...parts.added].sort((a, b) => a.id - b.id);
    const mkRe = (ts: AddedToken[]): RegExp | null =>
      ts.length === 0 ? null : new RegExp([...new Set(ts.map((t) => t.content))].sort((a, b) => b.length - a.length || (a < b ? -1 : 1)).map(escapeRegex).join('|'), 'gu');
    this.addedRe = mkRe(parts.added);
    this.addedReNoSpecial = mkRe(parts.added.filter((t) => !t.special));
    const idOf = (tok: string | null, which: string): number | null => {
      if (tok === null) return null;
      const id = this.tokenToId(tok);
      if (id === undefined) bad(`${which} token "${tok}" is not in the vocabulary`);
      return id!;
    };
    this.bosId = idOf(parts.bosToken, 'BOS');
    this.eosId = idOf(parts.eosToken, 'EOS');
  }

  /** Number of merges (ranks). */
  get numMerges(): number {
    return this.parts.merges.length;
  }

  /** The id of a token: a byte-level model token string (e.g. "Ġthe") or an added token's content; undefined when absent. */
  tokenToId(token: string): number | undefined {
    return this.addedByContent.get(token)?.id ?? this.parts.vocab.get(token);
  }

  /** The token string of an id (byte-level form for model tokens, content for added tokens); undefined for unused ids. */
  idToToken(id: number): string | undefined {
    return this.idToTok[id];
  }

  /** True when `id` is a special added token. */
  isSpecial(id: number): boolean {
    return this.addedById.get(id)?.special ?? false;
  }

  /**
   * The UTF-8 bytes an id decodes to (for streaming detokenization: concatenate and decode when a
   * character is complete). Throws TokenRangeError for ids outside [0, vocabSize) or unused ids.
   */
  tokenBytes(id: number): Uint8Array {
    let b = this.idBytes[id];
    if (b !== undefined) return b;
    const tok = Number.isInteger(id) ? this.idToTok[id] : undefined;
    if (tok === undefined) throw new TokenRangeError(`token id ${id} is not in the vocabulary (size ${this.vocabSize})`);
    if (!this.addedById.has(id)) {
      b = new Uint8Array(tok.length);
      for (let i = 0; i < tok.length; i++) {
        const c = tok.charCodeAt(i);
        const v = c < 512 ? CHAR_TO_BYTE[c] : -1;
        if (v < 0) {
          b = undefined; // a vocab entry outside the byte alphabet decodes to its own UTF-8, as in HF
          break;
        }
        b[i] = v;
      }
    }
    b ??= utf8.encode(tok);
    this.idBytes[id] = b;
    return b;
  }

  /** Encodes text to ids. See {@link EncodeOptions}. */
  encode(text: string, options: EncodeOptions = {}): Int32Array {
    const out = new IdBuffer(Math.max(16, text.length >> 2));
    if (options.addSpecial && this.bosId !== null) out.push1(this.bosId);
    const re = options.parseSpecial === false ? this.addedReNoSpecial : this.addedRe;
    if (re === null) {
      this.encodeSegment(text, out);
      return out.result();
    }
    re.lastIndex = 0;
    let last = 0;
    let skipWsFrom = -1;
    for (let m = re.exec(text); m !== null; m = re.exec(text)) {
      const t = this.addedByContent.get(m[0])!;
      let seg = text.slice(last, m.index);
      if (skipWsFrom === last) seg = seg.replace(/^\p{White_Space}+/u, '');
      if (t.lstrip) seg = seg.replace(/\p{White_Space}+$/u, '');
      this.encodeSegment(seg, out);
      out.push1(t.id);
      last = m.index + m[0].length;
      skipWsFrom = t.rstrip ? last : -1;
    }
    let tail = text.slice(last);
    if (skipWsFrom === last) tail = tail.replace(/^\p{White_Space}+/u, '');
    this.encodeSegment(tail, out);
    return out.result();
  }

  /** Decodes ids to text. Throws TokenRangeError for an id outside the vocabulary. */
  decode(ids: ArrayLike<number>, options: DecodeOptions = {}): string {
    let buf = new Uint8Array(Math.max(16, ids.length * 4));
    let n = 0;
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i];
      if (options.skipSpecial && this.addedById.get(id)?.special) continue;
      const b = this.tokenBytes(id);
      if (n + b.length > buf.length) {
        const nb = new Uint8Array(Math.max(buf.length * 2, n + b.length));
        nb.set(buf.subarray(0, n));
        buf = nb;
      }
      buf.set(b, n);
      n += b.length;
    }
    return utf8Decoder.decode(buf.subarray(0, n));
  }

  private encodeSegment(text: string, out: IdBuffer): void {
    if (text === '') return;
    for (const nf of this.parts.normalizers) text = text.normalize(nf);
    const stages = this.parts.stages;
    const only = stages.filter((st) => st.re !== null || st.addPrefixSpace);
    if (only.length === 1 && !only[0].addPrefixSpace) {
      // Fast path (Llama 3: one Split regex + ByteLevel without regex): no intermediate arrays.
      const re = only[0].re!;
      re.lastIndex = 0;
      let last = 0;
      for (let m = re.exec(text); m !== null; m = re.exec(text)) {
        if (m[0].length === 0) {
          re.lastIndex++;
          continue;
        }
        if (m.index > last) this.emitPiece(text.slice(last, m.index), out);
        this.emitPiece(m[0], out);
        last = m.index + m[0].length;
      }
      if (last < text.length) this.emitPiece(text.slice(last), out);
      return;
    }
    let pieces = [text];
    for (const st of stages) {
      const next: string[] = [];
      for (let p of pieces) {
        if (st.addPrefixSpace && !p.startsWith(' ')) p = ' ' + p;
        if (st.re) splitIsolated(p, st.re, next);
        else next.push(p);
      }
      pieces = next;
    }
    for (const p of pieces) this.emitPiece(p, out);
  }

  private emitPiece(p: string, out: IdBuffer): void {
    let ids = this.cache.get(p);
    if (ids === undefined) {
      ids = this.encodeWord(utf8.encode(p));
      if (this.cache.size >= CACHE_LIMIT) this.cache.clear();
      this.cache.set(p, ids);
    }
    out.append(ids);
  }

  /** BPE on one pre-token's bytes: lowest rank first, leftmost on ties (HF's heap order). */
  private encodeWord(bytes: Uint8Array): Int32Array {
    const n = bytes.length;
    if (this.parts.ignoreMerges) {
      const whole = this.parts.vocab.get(byteLevelOf(bytes));
      if (whole !== undefined) return Int32Array.of(whole);
    }
    const sym = new Int32Array(n);
    for (let i = 0; i < n; i++) sym[i] = this.byteIds[bytes[i]];
    if (n < 2) return sym;
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    const ranks = this.mergeRank;
    const heap: number[] = [];
    const push = (v: number): void => {
      let i = heap.length;
      heap.push(v);
      while (i > 0) {
        const p = (i - 1) >> 1;
        if (heap[p] <= v) break;
        heap[i] = heap[p];
        i = p;
      }
      heap[i] = v;
    };
    const pop = (): number => {
      const top = heap[0];
      const last = heap.pop()!;
      const len = heap.length;
      if (len > 0) {
        let i = 0;
        for (;;) {
          const l = 2 * i + 1;
          if (l >= len) break;
          const r = l + 1;
          const c = r < len && heap[r] < heap[l] ? r : l;
          if (heap[c] >= last) break;
          heap[i] = heap[c];
          i = c;
        }
        heap[i] = last;
      }
      return top;
    };
    for (let i = 0; i + 1 < n; i++) {
      const r = ranks.get(sym[i] * PAIR + sym[i + 1]);
      if (r !== undefined) push(r * POS + i);
    }
    let alive = n;
    while (heap.length > 0) {
      const top = pop();
      const r = Math.floor(top / POS);
      const i = top - r * POS;
      if (sym[i] < 0) continue;
      const j = next[i];
      if (j < 0 || ranks.get(sym[i] * PAIR + sym[j]) !== r) continue;
      sym[i] = this.mergeOut[r];
      sym[j] = -1;
      alive--;
      const nj = next[j];
      next[i] = nj;
      if (nj >= 0) prev[nj] = i;
      const p = prev[i];
      if (p >= 0) {
        const r2 = ranks.get(sym[p] * PAIR + sym[i]);
        if (r2 !== undefined) push(r2 * POS + p);
      }
      if (nj >= 0) {
        const r3 = ranks.get(sym[i] * PAIR + sym[nj]);
        if (r3 !== undefined) push(r3 * POS + i);
      }
    }
    const out = new Int32Array(alive);
    for (let i = 0, k = 0; i >= 0; i = next[i]) out[k++] = sym[i];
    return out;
  }

  /**
   * A `tokenizer.json` object HF tokenizers (and transformers' PreTrainedTokenizerFast) load:
   * BPE model with `vocab` and `merges` as [left, right] pairs, the tokenizer's normalizer and
   * pre-tokenizer (Llama 3 style Split + ByteLevel for trained ones), a ByteLevel decoder, and a
   * TemplateProcessing post-processor adding BOS when the tokenizer has one.
   */
  toTokenizerJson(): Record<string, unknown> {
    const vocab: Record<string, number> = {};
    for (const [t, id] of [...this.parts.vocab].sort((a, b) => a[1] - b[1])) vocab[t] = id;
    const bos = this.bosId === null ? null : this.idToTok[this.bosId]!;
    const byteLevelPost = { type: 'ByteLevel', add_prefix_space: true, trim_offsets: false, use_regex: true };
    const post =
      bos === null
        ? byteLevelPost
        : {
            type: 'Sequence',
            processors: [
              byteLevelPost,
              {
                type: 'TemplateProcessing',
                single: [{ SpecialToken: { id: bos, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
                pair: [
                  { SpecialToken: { id: bos, type_id: 0 } },
                  { Sequence: { id: 'A', type_id: 0 } },
                  { SpecialToken: { id: bos, type_id: 1 } },
                  { Sequence: { id: 'B', type_id: 1 } },
                ],
                special_tokens: { [bos]: { id: bos, ids: [this.bosId], tokens: [bos] } },
              },
            ],
          };
    return {
      version: '1.0',
      truncation: null,
      padding: null,
      added_tokens: this.addedTokens.map((t) => ({
        id: t.id,
        content: t.content,
        single_word: t.singleWord,
        lstrip: t.lstrip,
        rstrip: t.rstrip,
        normalized: t.normalized,
        special: t.special,
      })),
      normalizer: this.parts.json.normalizer,
      pre_tokenizer: this.parts.json.preTokenizer,
      post_processor: post,
      decoder: this.parts.json.decoder,
      model: {
        type: 'BPE',
        dropout: null,
        unk_token: null,
        continuing_subword_prefix: null,
        end_of_word_suffix: null,
        fuse_unk: false,
        byte_fallback: false,
        ignore_merges: this.parts.ignoreMerges,
        vocab,
        merges: this.parts.merges.map(([a, b]) => [a, b]),
      },
    };
  }

  /**
   * Writes `tokenizer.json` (atomically) and, when BOS or EOS is set, a minimal
   * `tokenizer_config.json` beside it (bos_token, eos_token, tokenizer_class
   * PreTrainedTokenizerFast) so transformers' AutoTokenizer knows them.
   * @param file path of the tokenizer.json to write.
   */
  save(file: string): void {
    writeFileAtomic(file, JSON.stringify(this.toTokenizerJson(), null, 2) + '\n');
    if (this.bosId !== null || this.eosId !== null) {
      const cfg = {
        added_tokens_decoder: Object.fromEntries(
          this.addedTokens.map((t) => [String(t.id), { content: t.content, lstrip: t.lstrip, normalized: t.normalized, rstrip: t.rstrip, single_word: t.singleWord, special: t.special }]),
        ),
        bos_token: this.bosId === null ? null : this.idToTok[this.bosId],
        eos_token: this.eosId === null ? null : this.idToTok[this.eosId],
        clean_up_tokenization_spaces: false,
        tokenizer_class: 'PreTrainedTokenizerFast',
      };
      writeFileAtomic(path.join(path.dirname(file), 'tokenizer_config.json'), JSON.stringify(cfg, null, 2) + '\n');
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// tokenizer.json loading

/** Options of {@link loadTokenizerJson}. */
export interface LoadTokenizerOptions {
  /** BOS token content. Default: the first SpecialToken of a TemplateProcessing post-processor, else a known name (`<|begin_of_text|>`, `<s>`, ...) present in the vocab, else none. */
  bosToken?: string | null;
  /** EOS token content. Default: a known name (`<|end_of_text|>`, `</s>`, `<|endoftext|>`, ...) present in the vocab, else none. */
  eosToken?: string | null;
  /** Name used in error messages. Default 'tokenizer.json'. */
  source?: string;
}

const KNOWN_BOS = ['<|begin_of_text|>', '<s>', '<|startoftext|>', '<bos>', '<|im_start|>'];
const KNOWN_EOS = ['<|end_of_text|>', '</s>', '<|endoftext|>', '<eos>', '<|eot_id|>', '<|im_end|>'];

type J = Record<string, unknown>;

function isObj(v: unknown): v is J {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function parseNormalizer(n: unknown, source: string): Normalization[] {
  if (n === null || n === undefined) return [];
  if (!isObj(n)) throw new FormatError(`${source}: normalizer must be an object or null`);
  if (n.type === 'Sequence') {
    if (!Array.isArray(n.normalizers)) throw new FormatError(`${source}: normalizer Sequence lacks "normalizers"`);
    return n.normalizers.flatMap((m) => parseNormalizer(m, source));
  }
  if (n.type === 'NFC' || n.type === 'NFD' || n.type === 'NFKC' || n.type === 'NFKD') return [n.type];
  throw new UnsupportedFeatureError(`${source}: normalizer ${JSON.stringify(n.type)} is not supported (only NFC, NFD, NFKC, NFKD or none; Prepend/Replace normalizers belong to SentencePiece-style tokenizers)`);
}

function parsePreTokenizer(p: unknown, source: string): Stage[] {
  if (!isObj(p)) throw new UnsupportedFeatureError(`${source}: a byte-level BPE tokenizer needs a ByteLevel pre_tokenizer, got ${JSON.stringify(p)}`);
  const list: unknown[] = p.type === 'Sequence' ? (Array.isArray(p.pretokenizers) ? p.pretokenizers : []) : [p];
  const stages: Stage[] = [];
  let byteLevel = 0;
  for (const s of list) {
    if (!isObj(s)) throw new FormatError(`${source}: pre_tokenizer entry must be an object`);
    switch (s.type) {
      case 'ByteLevel':
        byteLevel++;
        stages.push({ re: s.use_regex === false ? null : compilePattern(GPT2_PATTERN), addPrefixSpace: s.add_prefix_space === true });
        break;
      case 'Split': {
        if (s.behavior !== 'Isolated') throw new UnsupportedFeatureError(`${source}: Split pre-tokenizer behavior ${JSON.stringify(s.behavior)} is not supported (only "Isolated")`);
        if (s.invert === true) throw new UnsupportedFeatureError(`${source}: Split pre-tokenizer with invert: true is not supported`);
        const pat = s.pattern as J | undefined;
        let re: RegExp;
        if (isObj(pat) && typeof pat.Regex === 'string') re = compilePattern(pat.Regex);
        else if (isObj(pat) && typeof pat.String === 'string') re = new RegExp(escapeRegex(pat.String), 'gu');
        else throw new FormatError(`${source}: Split pre-tokenizer needs pattern {"Regex": ...} or {"String": ...}, got ${JSON.stringify(pat)}`);
        stages.push({ re, addPrefixSpace: false });
        break;
      }
      case 'Digits':
        stages.push({ re: s.individual_digits === true ? /\p{N}/gu : /\p{N}+/gu, addPrefixSpace: false });
        break;
      default:
        throw new UnsupportedFeatureError(`${source}: pre-tokenizer ${JSON.stringify(s.type)} is not supported (supported: ByteLevel, Split, Digits)`);
    }
  }
  if (byteLevel !== 1) throw new UnsupportedFeatureError(`${source}: expected exactly one ByteLevel pre-tokenizer (byte-level BPE), found ${byteLevel}`);
  return stages;
}

function checkDecoder(d: unknown, source: string): void {
  const list: unknown[] = isObj(d) && d.type === 'Sequence' && Array.isArray(d.decoders) ? d.decoders : [d];
  if (!list.some((x) => isObj(x) && x.type === 'ByteLevel')) {
    throw new UnsupportedFeatureError(`${source}: decoder must be ByteLevel for byte-level BPE, got ${JSON.stringify(isObj(d) ? d.type : d)}`);
  }
  for (const x of list) {
    if (!isObj(x) || x.type !== 'ByteLevel') throw new UnsupportedFeatureError(`${source}: decoder ${JSON.stringify(isObj(x) ? x.type : x)} in a Sequence is not supported (only ByteLevel)`);
  }
}

function templateBos(post: unknown): string | null {
  if (!isObj(post)) return null;
  if (post.type === 'Sequence' && Array.isArray(post.processors)) {
    for (const p of post.processors) {
      const b = templateBos(p);
      if (b !== null) return b;
    }
    return null;
  }
  if (post.type === 'TemplateProcessing' && Array.isArray(post.single)) {
    const first = post.single[0] as J | undefined;
    if (isObj(first) && isObj(first.SpecialToken) && typeof first.SpecialToken.id === 'string') return first.SpecialToken.id;
  }
  return null;
}

/**
 * Builds a tokenizer from a Hugging Face `tokenizer.json` (parsed object or JSON text).
 * Accepted: model BPE (vocab, merges as `"a b"` strings or `["a","b"]` pairs, ignore_merges),
 * pre_tokenizer ByteLevel or Sequence of Split / Digits / ByteLevel, decoder ByteLevel, normalizer
 * none or NF*, added_tokens.
 * @throws FormatError for malformed content (empty merges, merge results missing from the vocab,
 *   missing byte tokens, duplicate ids); UnsupportedFeatureError for Unigram / WordPiece / WordLevel
 *   models, byte_fallback (SentencePiece BPE), dropout, subword prefixes/suffixes, other pre-tokenizers.
 */
export function loadTokenizerJson(json: unknown, options: LoadTokenizerOptions = {}): BpeTokenizer {
  const source = options.source ?? 'tokenizer.json';
  let j: unknown = json;
  if (typeof json === 'string') {
    try {
      j = JSON.parse(json);
    } catch (e) {
      throw new FormatError(`${source}: not valid JSON (${(e as Error).message})`, { cause: e });
    }
  }
  if (!isObj(j)) throw new FormatError(`${source}: must be a JSON object`);
  const m = j.model;
  if (!isObj(m)) throw new FormatError(`${source}: "model" must be an object`);
  const type = m.type ?? (m.merges !== undefined ? 'BPE' : undefined);
  if (type !== 'BPE') {
    throw new UnsupportedFeatureError(`${source}: model type ${JSON.stringify(type)} is not supported (only byte-level BPE, as in GPT-2 / Llama 3)`);
  }
  if (m.byte_fallback === true) {
    throw new UnsupportedFeatureError(`${source}: BPE with byte_fallback (SentencePiece style, e.g. Llama 2) is not supported; only byte-level BPE (GPT-2 / Llama 3 style)`);
  }
  if (typeof m.dropout === 'number' && m.dropout > 0) throw new UnsupportedFeatureError(`${source}: BPE dropout (${m.dropout}) is not supported`);
  if (m.continuing_subword_prefix || m.end_of_word_suffix) {
    throw new UnsupportedFeatureError(`${source}: continuing_subword_prefix / end_of_word_suffix are not supported (byte-level BPE has neither)`);
  }
  if (!isObj(m.vocab)) throw new FormatError(`${source}: model.vocab must be an object of token -> id`);
  if (!Array.isArray(m.merges)) throw new FormatError(`${source}: model.merges must be an array, got ${JSON.stringify(m.merges)?.slice(0, 40)}`);
  const vocab = new Map<string, number>(Object.entries(m.vocab as Record<string, number>));
  const merges: [string, string][] = m.merges.map((e: unknown, i: number): [string, string] => {
    if (typeof e === 'string') {
      const parts = e.split(' ');
      if (parts.length !== 2 || parts[0] === '' || parts[1] === '') throw new FormatError(`${source}: model.merges[${i}] = ${JSON.stringify(e)} is not "left right"`);
      return [parts[0], parts[1]];
    }
    if (Array.isArray(e) && e.length === 2 && typeof e[0] === 'string' && typeof e[1] === 'string') return [e[0], e[1]];
    throw new FormatError(`${source}: model.merges[${i}] = ${JSON.stringify(e)} is neither "left right" nor ["left", "right"]`);
  });
  const addedRaw = j.added_tokens ?? [];
  if (!Array.isArray(addedRaw)) throw new FormatError(`${source}: added_tokens must be an array`);
  const added: AddedToken[] = addedRaw.map((t: unknown, i: number) => {
    if (!isObj(t) || typeof t.content !== 'string' || typeof t.id !== 'number') throw new FormatError(`${source}: added_tokens[${i}] needs a numeric id and string content`);
    return {
      id: t.id,
      content: t.content,
      special: t.special === true,
      lstrip: t.lstrip === true,
      rstrip: t.rstrip === true,
      singleWord: t.single_word === true,
      normalized: t.normalized === true,
    };
  });
  const normalizers = parseNormalizer(j.normalizer, source);
  const stages = parsePreTokenizer(j.pre_tokenizer, source);
  checkDecoder(j.decoder, source);
  const has = (s: string): boolean => vocab.has(s) || added.some((t) => t.content === s);
  const bosToken = options.bosToken !== undefined ? options.bosToken : templateBos(j.post_processor) ?? KNOWN_BOS.find(has) ?? null;
  const eosToken = options.eosToken !== undefined ? options.eosToken : KNOWN_EOS.find(has) ?? null;
  return new BpeTokenizer(
    {
      vocab,
      merges,
      added,
      ignoreMerges: m.ignore_merges === true,
      normalizers,
      stages,
      json: { normalizer: j.normalizer ?? null, preTokenizer: j.pre_tokenizer, decoder: j.decoder },
      bosToken,
      eosToken,
    },
    source,
  );
}

/**
 * Loads `tokenizer.json` from a file or a model directory. BOS/EOS default to `bos_token` /
 * `eos_token` of a `tokenizer_config.json` beside it (string or `{content}`), then to
 * {@link LoadTokenizerOptions} detection.
 */
export function loadTokenizerFile(fileOrDir: string, options: Omit<LoadTokenizerOptions, 'source'> = {}): BpeTokenizer {
  const file = fs.statSync(fileOrDir).isDirectory() ? path.join(fileOrDir, 'tokenizer.json') : fileOrDir;
  const cfgPath = path.join(path.dirname(file), 'tokenizer_config.json');
  const opts: LoadTokenizerOptions = { ...options, source: file };
  if (fs.existsSync(cfgPath)) {
    let cfg: unknown;
    try {
      cfg = JSON.parse(fs.readFileSync(cfgPath, 'utf8'));
    } catch (e) {
      throw new FormatError(`${cfgPath}: not valid JSON (${(e as Error).message})`, { cause: e });
    }
    const tok = (v: unknown): string | null | undefined => (typeof v === 'string' ? v : isObj(v) && typeof v.content === 'string' ? v.content : v === null ? null : undefined);
    if (isObj(cfg)) {
      if (opts.bosToken === undefined && tok(cfg.bos_token) !== undefined) opts.bosToken = tok(cfg.bos_token);
      if (opts.eosToken === undefined && tok(cfg.eos_token) !== undefined) opts.eosToken = tok(cfg.eos_token);
    }
  }
  return loadTokenizerJson(fs.readFileSync(file, 'utf8'), opts);
}

// ---------------------------------------------------------------------------------------------------
// training

/** Options of {@link trainBpe}. */
export interface TrainBpeOptions {
  /** Total vocabulary size including the 256 byte tokens and the special tokens. Required; >= 256 + specialTokens.length. */
  vocabSize: number;
  /** Special tokens, given ids after the model vocab (like Llama 3), in this order. Default []. */
  specialTokens?: string[];
  /** Which special token is BOS (must be in specialTokens). Default none. */
  bosToken?: string;
  /** Which special token is EOS (must be in specialTokens). Default none. */
  eosToken?: string;
  /** A pair must occur at least this many times (weighted by word frequency) to be merged; training stops earlier otherwise. Default 2. */
  minFrequency?: number;
  /** Called with the fraction of merges done, in [0, 1], at most once per percent. */
  onProgress?: (fraction: number) => void;
  /** Aborts training (AbortError) between texts and between merges. */
  signal?: AbortSignal;
}

function cmpStr(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/**
 * Trains a byte-level BPE tokenizer with the Llama 3 pre-tokenizer.
 * @param texts strings, or an (async) iterable of strings (e.g. documents or lines). Special tokens
 *   occurring in the text are cut out before counting.
 * @returns the tokenizer; ids 0..255 are the bytes (id = byte value), then merges in rank order,
 *   then the special tokens.
 */
export async function trainBpe(texts: Iterable<string> | AsyncIterable<string>, options: TrainBpeOptions): Promise<BpeTokenizer> {
  const specials = options.specialTokens ?? [];
  const minFreq = options.minFrequency ?? 2;
  const { vocabSize, signal, onProgress } = options;
  if (!Number.isSafeInteger(vocabSize) || vocabSize < 256 + specials.length || vocabSize > MAX_VOCAB_SIZE) {
    throw new ArgumentError(`trainBpe: vocabSize must be an integer in [${256 + specials.length}, ${MAX_VOCAB_SIZE}] (256 bytes + ${specials.length} special tokens), got ${vocabSize}`);
  }
  if (new Set(specials).size !== specials.length || specials.some((s) => typeof s !== 'string' || s === '')) {
    throw new ArgumentError(`trainBpe: specialTokens must be distinct non-empty strings, got ${JSON.stringify(specials)}`);
  }
  for (const [k, v] of [['bosToken', options.bosToken], ['eosToken', options.eosToken]] as const) {
    if (v !== undefined && !specials.includes(v)) throw new ArgumentError(`trainBpe: ${k} ${JSON.stringify(v)} must be one of specialTokens ${JSON.stringify(specials)}`);
  }
  if (!(minFreq >= 1)) throw new ArgumentError(`trainBpe: minFrequency must be >= 1, got ${minFreq}`);
  const checkAbort = (): void => {
    if (signal?.aborted) throw new AbortError('trainBpe was aborted');
  };
  let lastYield = Date.now();
  const maybeYield = async (): Promise<void> => {
    if (Date.now() - lastYield > 50) {
      await new Promise((r) => setImmediate(r));
      lastYield = Date.now();
    }
    checkAbort();
  };
  checkAbort();

  // 1. Count pre-tokens.
  const re = compilePattern(LLAMA3_PATTERN);
  const specialRe = specials.length ? new RegExp([...specials].sort((a, b) => b.length - a.length).map(escapeRegex).join('|'), 'gu') : null;
  const wordCounts = new Map<string, number>();
  const countText = (t: string): void => {
    const segs = specialRe ? t.split(specialRe) : [t];
    for (const seg of segs) {
      re.lastIndex = 0;
      for (let m = re.exec(seg); m !== null; m = re.exec(seg)) {
        const w = m[0];
        if (w.length === 0) {
          re.lastIndex++;
          continue;
        }
        wordCounts.set(w, (wordCounts.get(w) ?? 0) + 1);
      }
    }
  };
  if (Symbol.asyncIterator in (texts as object)) {
    for await (const t of texts as AsyncIterable<string>) {
      countText(t);
      await maybeYield();
    }
  } else {
    for (const t of texts as Iterable<string>) {
      countText(t);
      await maybeYield();
    }
  }

  // 2. Words as symbol arrays (ids = byte values).
  const W = wordCounts.size;
  const words: Int32Array[] = new Array(W);
  const lens = new Int32Array(W);
  const counts = new Float64Array(W);
  {
    let w = 0;
    for (const [s, c] of wordCounts) {
      const b = utf8.encode(s);
      words[w] = Int32Array.from(b);
      lens[w] = b.length;
      counts[w] = c;
      w++;
    }
  }
  wordCounts.clear();
  // Token strings as "binary strings" (char code = byte) so that < compares bytes.
  const tok: string[] = [];
  for (let b = 0; b < 256; b++) tok.push(String.fromCharCode(b));
  const tokId = new Map<string, number>(tok.map((t, i) => [t, i]));

  const S = vocabSize; // pair key = a * S + b
  const pairCount = new Map<number, number>();
  const where = new Map<number, number[]>();
  for (let w = 0; w < W; w++) {
    const s = words[w];
    const c = counts[w];
    for (let i = 0; i + 1 < lens[w]; i++) {
      const k = s[i] * S + s[i + 1];
      pairCount.set(k, (pairCount.get(k) ?? 0) + c);
      let l = where.get(k);
      if (!l) where.set(k, (l = []));
      if (l[l.length - 1] !== w) l.push(w);
    }
  }

  // 3. Max-heap on (count desc, left bytes asc, right bytes asc), lazily invalidated.
  const hc: number[] = [];
  const hk: number[] = [];
  const better = (c1: number, k1: number, c2: number, k2: number): boolean => {
    if (c1 !== c2) return c1 > c2;
    const a1 = Math.floor(k1 / S);
    const a2 = Math.floor(k2 / S);
    const d = a1 === a2 ? 0 : cmpStr(tok[a1], tok[a2]);
    if (d !== 0) return d < 0;
    return cmpStr(tok[k1 - a1 * S], tok[k2 - a2 * S]) < 0;
  };
  const hpush = (c: number, k: number): void => {
    let i = hc.length;
    hc.push(c);
    hk.push(k);
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!better(c, k, hc[p], hk[p])) break;
      hc[i] = hc[p];
      hk[i] = hk[p];
      i = p;
    }
    hc[i] = c;
    hk[i] = k;
  };
  const hpop = (): void => {
    const c = hc.pop()!;
    const k = hk.pop()!;
    const len = hc.length;
    if (len === 0) return;
    let i = 0;
    for (;;) {
      const l = 2 * i + 1;
      if (l >= len) break;
      const r = l + 1;
      const ch = r < len && better(hc[r], hk[r], hc[l], hk[l]) ? r : l;
      if (!better(hc[ch], hk[ch], c, k)) break;
      hc[i] = hc[ch];
      hk[i] = hk[ch];
      i = ch;
    }
    hc[i] = c;
    hk[i] = k;
  };
  for (const [k, c] of pairCount) hpush(c, k);

  const targetModel = vocabSize - specials.length;
  const totalMerges = targetModel - 256;
  const merges: [number, number][] = [];
  const stamp = new Int32Array(W).fill(-1);
  const increased = new Set<number>();
  let lastPct = -1;
  const add = (k: number, d: number, w: number): void => {
    const v = (pairCount.get(k) ?? 0) + d;
    if (v <= 0) pairCount.delete(k);
    else pairCount.set(k, v);
    if (d > 0) {
      increased.add(k);
      let l = where.get(k);
      if (!l) where.set(k, (l = []));
      if (l[l.length - 1] !== w) l.push(w);
    }
  };
  while (tok.length < targetModel && hc.length > 0) {
    const c = hc[0];
    const key = hk[0];
    hpop();
    const cur = pairCount.get(key) ?? 0;
    if (cur !== c) {
      if (cur > 0 && cur < c) hpush(cur, key);
      continue;
    }
    if (c < minFreq) break;
    const a = Math.floor(key / S);
    const b = key - a * S;
    const str = tok[a] + tok[b];
    let nid = tokId.get(str);
    if (nid === undefined) {
      nid = tok.length;
      tok.push(str);
      tokId.set(str, nid);
    }
    const step = merges.length;
    merges.push([a, b]);
    pairCount.delete(key);
    const list = where.get(key) ?? [];
    where.delete(key);
    for (const w of list) {
      if (stamp[w] === step) continue;
      stamp[w] = step;
      const s = words[w];
      const len = lens[w];
      const cw = counts[w];
      let j = 0;
      for (let i = 0; i < len; i++) {
        if (i + 1 < len && s[i] === a && s[i + 1] === b) {
          if (j > 0) {
            const p = s[j - 1];
            const k1 = p * S + a;
            if (k1 !== key) add(k1, -cw, w);
            add(p * S + nid, cw, w);
          }
          if (i + 2 < len) {
            const nx = s[i + 2];
            const k2 = b * S + nx;
            if (k2 !== key) add(k2, -cw, w);
            add(nid * S + nx, cw, w);
          }
          s[j++] = nid;
          i++;
        } else {
          s[j++] = s[i];
        }
      }
      lens[w] = j;
    }
    for (const k of increased) {
      const v = pairCount.get(k);
      if (v !== undefined) hpush(v, k);
    }
    increased.clear();
    if ((step & 63) === 0) await maybeYield();
    if (onProgress) {
      const pct = Math.floor(((tok.length - 256) / Math.max(1, totalMerges)) * 100);
      if (pct !== lastPct) {
        lastPct = pct;
        onProgress(Math.min(1, pct / 100));
      }
    }
  }
  if (onProgress && lastPct !== 100) onProgress(1);

  // 4. Assemble: byte-level strings, specials after the model vocab.
  const toBL = (s: string): string => {
    let o = '';
    for (let i = 0; i < s.length; i++) o += BYTE_TO_CHAR[s.charCodeAt(i)];
    return o;
  };
  const vocab = new Map<string, number>(tok.map((t, i) => [toBL(t), i]));
  const added: AddedToken[] = specials.map((content, i) => ({ id: tok.length + i, content, special: true, lstrip: false, rstrip: false, singleWord: false, normalized: false }));
  if (merges.length === 0) throw new ArgumentError('trainBpe: no pair reached minFrequency; the texts are too small to learn any merge');
  return new BpeTokenizer(
    {
      vocab,
      merges: merges.map(([a, b]) => [toBL(tok[a]), toBL(tok[b])]),
      added,
      ignoreMerges: false,
      normalizers: [],
      stages: [{ re, addPrefixSpace: false }, { re: null, addPrefixSpace: false }],
      json: {
        normalizer: null,
        preTokenizer: {
          type: 'Sequence',
          pretokenizers: [
            { type: 'Split', pattern: { Regex: LLAMA3_PATTERN }, behavior: 'Isolated', invert: false },
            { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: false },
          ],
        },
        decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
      },
      bosToken: options.bosToken ?? null,
      eosToken: options.eosToken ?? null,
    },
    'trainBpe',
  );
}
