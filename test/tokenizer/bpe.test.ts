import { describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AbortError, ArgumentError, FormatError, TokenRangeError, UnsupportedFeatureError } from '../../lib/errors.js';
import { BpeTokenizer, loadTokenizerFile, loadTokenizerJson, trainBpe } from '../../lib/tokenizer/bpe.js';
import { BYTE_TO_CHAR, LLAMA3_REGEX, compilePattern, splitIsolated } from '../../lib/tokenizer/pretokenize.js';

const fixtures = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'fixtures', 'tokenizer');
const readFixture = (name: string): Record<string, any> => JSON.parse(fs.readFileSync(path.join(fixtures, name), 'utf8'));
const STRINGS = 'tiny.merges-strings.tokenizer.json';
const PAIRS = 'tiny.merges-pairs.tokenizer.json';

/** Byte-level form of a text, e.g. " the" -> "Ġthe". */
const bl = (s: string): string => Array.from(Buffer.from(s, 'utf8'), (b) => BYTE_TO_CHAR[b]).join('');

function toks(t: BpeTokenizer, ids: Int32Array): string[] {
  return Array.from(ids, (id) => t.idToToken(id)!);
}

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let x = s;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 2 ** 32;
  };
}

/** Random Unicode text: ASCII, Latin, CJK, emoji (astral), combining marks, odd whitespace, CRLF. No lone surrogates. */
function randomUnicode(r: () => number, len: number): string {
  const pools: [number, number][] = [
    [0x20, 0x7e],
    [0x20, 0x7e],
    [0xa0, 0x24f],
    [0x300, 0x36f],
    [0x4e00, 0x4fff],
    [0x1f300, 0x1f64f],
    [0x10000, 0x10ffff],
    [0x2000, 0x206f],
    [0xe000, 0xf8ff],
  ];
  const ws = ['\r\n', '\n', '\r', '\t', ' ', '   ', '\u0085', '\u00a0', '\u3000', '\ufeff', '\u2028', ' '.repeat(40)];
  let s = '';
  while (s.length < len) {
    const k = r();
    if (k < 0.15) s += ws[Math.floor(r() * ws.length)];
    else if (k < 0.2) s += "'s'T'Re'll"[Math.floor(r() * 10)];
    else {
      const [a, b] = pools[Math.floor(r() * pools.length)];
      let cp = a + Math.floor(r() * (b - a + 1));
      if (cp >= 0xd800 && cp <= 0xdfff) cp = 0x41;
      s += String.fromCodePoint(cp);
    }
  }
  return s;
}

describe('pre-tokenizer', () => {
  it('Llama 3 pattern splits like tiktoken', () => {
    expect(splitIsolated("Hello world's 12345 tests!!\n\n  ok  ", LLAMA3_REGEX)).toEqual(['Hello', ' world', "'s", ' ', '123', '45', ' tests', '!!\n\n', ' ', ' ok', '  ']);
    expect(splitIsolated("I'M WE'LL", LLAMA3_REGEX)).toEqual(['I', "'M", ' WE', "'LL"]);
    expect(splitIsolated('a\r\n\r\nb', LLAMA3_REGEX)).toEqual(['a', '\r\n\r\n', 'b']);
  });
  it('translates (?i:...) and \\s', () => {
    const re = compilePattern("(?i:'s|\\p{L}x)|\\s+");
    expect(re.flags).toBe('gu');
    expect(splitIsolated("'S'ſ AX bx\u0085", re)).toEqual(["'S", "'ſ", ' ', 'AX', ' ', 'bx', '\u0085']);
    expect(() => compilePattern('a++(?>b)')).toThrow(UnsupportedFeatureError);
  });
});

describe('loading tokenizer.json', () => {
  const a = loadTokenizerJson(readFixture(STRINGS));
  const b = loadTokenizerJson(JSON.stringify(readFixture(PAIRS)));

  it('both merges spellings give identical tokenizers', () => {
    expect(a.numMerges).toBe(13);
    expect(b.numMerges).toBe(13);
    const r = rng(7);
    const texts = ['the lowest', 'the lowest and her', "she's in the tower, lowest est", ...Array.from({ length: 20 }, () => randomUnicode(r, 60))];
    for (const t of texts) expect(Array.from(b.encode(t))).toEqual(Array.from(a.encode(t)));
  });

  it('applies merges in rank order', () => {
    expect(toks(a, a.encode('the lowest'))).toEqual(['t', 'he', 'Ġ', 'lowest']);
    expect(toks(a, a.encode(' the'))).toEqual(['Ġthe']);
    // "her": (h,e) has rank 1 and (e,r) rank 5, so "he" + "r" and not "h" + "er".
    expect(toks(a, a.encode('her'))).toEqual(['he', 'r']);
    // "ers": no "he" competitor, so "er" wins.
    expect(toks(a, a.encode('ers'))).toEqual(['er', 's']);
    expect(toks(a, a.encode(' and'))).toEqual(['Ġand']);
    expect(toks(a, a.encode('lowes'))).toEqual(['low', 'es']);
  });

  it('honours ignore_merges', () => {
    const j = readFixture(PAIRS);
    j.model.ignore_merges = true;
    const t = loadTokenizerJson(j);
    expect(toks(t, t.encode('the lowest'))).toEqual(['t', 'he', 'Ġlowest']);
    expect(toks(a, a.encode(' lowest'))).toEqual(['Ġ', 'lowest']);
  });

  it('special tokens: matched before pre-tokenization, BOS/EOS detected, skipSpecial', () => {
    const bos = a.tokenToId('<|begin_of_text|>')!;
    const eos = a.tokenToId('<|end_of_text|>')!;
    expect(a.bosId).toBe(bos);
    expect(a.eosId).toBe(eos);
    expect(a.vocabSize).toBe(eos + 1);
    expect(a.isSpecial(bos)).toBe(true);
    const ids = a.encode('<|begin_of_text|>the lowest<|end_of_text|> the', { addSpecial: true });
    expect(toks(a, ids)).toEqual(['<|begin_of_text|>', '<|begin_of_text|>', 't', 'he', 'Ġ', 'lowest', '<|end_of_text|>', 'Ġthe']);
    expect(a.decode(ids)).toBe('<|begin_of_text|><|begin_of_text|>the lowest<|end_of_text|> the');
    expect(a.decode(ids, { skipSpecial: true })).toBe('the lowest the');
    const plain = a.encode('<|end_of_text|>', { parseSpecial: false });
    expect(plain.length).toBeGreaterThan(1);
    expect(Array.from(plain)).not.toContain(eos);
    expect(a.decode(plain)).toBe('<|end_of_text|>');
  });

  it('lstrip / rstrip absorb whitespace around an added token', () => {
    const j = readFixture(PAIRS);
    j.added_tokens.push({ id: 300, content: '<mask>', lstrip: true, rstrip: true, special: true, single_word: false, normalized: false });
    const t = loadTokenizerJson(j);
    expect(toks(t, t.encode('the  <mask>  the'))).toEqual(['t', 'he', '<mask>', 't', 'he']);
  });

  it('GPT-2 style ByteLevel pre-tokenizer with add_prefix_space', () => {
    const j = readFixture(PAIRS);
    j.pre_tokenizer = { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true };
    const t = loadTokenizerJson(j);
    expect(toks(t, t.encode('the lowest'))).toEqual(['Ġthe', 'Ġ', 'lowest']);
    expect(t.decode(t.encode('the lowest'))).toBe(' the lowest');
  });

  it('NFC normalizer is applied', () => {
    const j = readFixture(PAIRS);
    j.normalizer = { type: 'NFC' };
    const t = loadTokenizerJson(j);
    expect(t.decode(t.encode('e\u0301'))).toBe('\u00e9');
  });

  it('decode rejects ids outside the vocabulary', () => {
    expect(() => a.decode([a.vocabSize])).toThrow(TokenRangeError);
    expect(() => a.decode([-1])).toThrow(TokenRangeError);
  });
});

describe('tokenizer.json errors', () => {
  const expectErr = (mutate: (j: Record<string, any>) => void, Cls: typeof FormatError | typeof UnsupportedFeatureError, re: RegExp): void => {
    const j = readFixture(PAIRS);
    mutate(j);
    let err: unknown;
    try {
      loadTokenizerJson(j);
    } catch (e) {
      err = e;
    }
    expect(err).toBeInstanceOf(Cls);
    expect((err as Error).message).toMatch(re);
  };
  it('empty merges is a FormatError, never a byte-level fallback', () => {
    expectErr((j) => (j.model.merges = []), FormatError, /merges is empty/);
  });
  it('a merge whose result is missing from the vocab', () => {
    expectErr((j) => delete j.model.vocab['Ġthe'], FormatError, /merges\[2\] \("Ġt" "he"\): the merged token "Ġthe" is not in the vocab/);
    expectErr((j) => delete j.model.vocab['Ġt'], FormatError, /merges\[0\].*"Ġt" is not in the vocab/);
  });
  it('malformed merges and missing byte tokens', () => {
    expectErr((j) => (j.model.merges = ['Ġ t', 'he']), FormatError, /merges\[1\] = "he" is not "left right"/);
    expectErr((j) => (j.model.merges = [['Ġ', 't', 'x']]), FormatError, /neither "left right" nor \["left", "right"\]/);
    expectErr((j) => delete j.model.vocab['Ġ'], FormatError, /lacks 1 of the 256 byte-level base tokens \(bytes 0x20 "Ġ"\)/);
    expectErr((j) => (j.model.vocab.dup = 5), FormatError, /id 5 is used by both/);
  });
  it('unsupported models name what is unsupported', () => {
    expectErr((j) => (j.model = { type: 'Unigram', vocab: [['a', 0]] }), UnsupportedFeatureError, /model type "Unigram" is not supported/);
    expectErr((j) => (j.model = { type: 'WordPiece', vocab: {} }), UnsupportedFeatureError, /model type "WordPiece"/);
    expectErr((j) => (j.model.byte_fallback = true), UnsupportedFeatureError, /byte_fallback \(SentencePiece style/);
    expectErr((j) => (j.pre_tokenizer = { type: 'Metaspace', replacement: '▁' }), UnsupportedFeatureError, /pre-tokenizer "Metaspace"/);
    expectErr((j) => (j.normalizer = { type: 'Sequence', normalizers: [{ type: 'Prepend', prepend: '▁' }] }), UnsupportedFeatureError, /normalizer "Prepend"/);
    expectErr((j) => (j.decoder = { type: 'Metaspace' }), UnsupportedFeatureError, /decoder must be ByteLevel/);
    expectErr((j) => (j.model.dropout = 0.1), UnsupportedFeatureError, /dropout/);
  });
});

/** Plain BPE training: recount every pair each step. The oracle for the incremental trainer. */
function referenceMerges(texts: string[], vocabSize: number, minFrequency: number): [string, string][] {
  const counts = new Map<string, number>();
  for (const t of texts) for (const w of splitIsolated(t, LLAMA3_REGEX)) counts.set(w, (counts.get(w) ?? 0) + 1);
  const words = [...counts].map(([w, c]) => ({ s: Array.from(Buffer.from(w, 'utf8'), (b) => String.fromCharCode(b)), c }));
  const vocab = new Set<string>(Array.from({ length: 256 }, (_, i) => String.fromCharCode(i)));
  const merges: [string, string][] = [];
  while (vocab.size < vocabSize) {
    const pc = new Map<string, { a: string; b: string; n: number }>();
    for (const { s, c } of words) {
      for (let i = 0; i + 1 < s.length; i++) {
        const k = JSON.stringify([s[i], s[i + 1]]);
        const e = pc.get(k) ?? { a: s[i], b: s[i + 1], n: 0 };
        e.n += c;
        pc.set(k, e);
      }
    }
    let best: { a: string; b: string; n: number } | null = null;
    for (const e of pc.values()) {
      if (!best || e.n > best.n || (e.n === best.n && (e.a < best.a || (e.a === best.a && e.b < best.b)))) best = e;
    }
    if (!best || best.n < minFrequency) break;
    merges.push([best.a, best.b]);
    vocab.add(best.a + best.b);
    for (const w of words) {
      const out: string[] = [];
      for (let i = 0; i < w.s.length; i++) {
        if (i + 1 < w.s.length && w.s[i] === best.a && w.s[i + 1] === best.b) {
          out.push(best.a + best.b);
          i++;
        } else out.push(w.s[i]);
      }
      w.s = out;
    }
  }
  const toBl = (s: string): string => Array.from(s, (ch) => BYTE_TO_CHAR[ch.charCodeAt(0)]).join('');
  return merges.map(([a, b]) => [toBl(a), toBl(b)]);
}

function corpus(seed: number, nDocs: number): string[] {
  const r = rng(seed);
  const words = ['the', 'lower', 'lowest', 'newer', 'wider', 'tokenizer', 'merge', 'merges', 'aaaa', 'aa', 'banana', 'naïve', 'café', '東京', '🙂🙂', "it's", 'WE\'LL', '2024', '3.14159', 'x', '   ', '\n\n', '\r\n'];
  const docs: string[] = [];
  for (let d = 0; d < nDocs; d++) {
    let s = '';
    const n = 5 + Math.floor(r() * 30);
    for (let i = 0; i < n; i++) s += (r() < 0.8 ? ' ' : '') + words[Math.floor(r() ** 2 * words.length)];
    docs.push(s);
  }
  return docs;
}

describe('trainBpe', () => {
  it('matches a from-scratch reference trainer merge for merge', async () => {
    const docs = corpus(1, 300);
    const t = await trainBpe(docs, { vocabSize: 400, minFrequency: 2 });
    const got = (t.toTokenizerJson().model as { merges: [string, string][] }).merges;
    const want = referenceMerges(docs, 400, 2);
    expect(got.length).toBeGreaterThan(20);
    expect(got).toEqual(want);
  });

  it('is deterministic, also under document reordering and async input', async () => {
    const docs = corpus(2, 200);
    const t1 = await trainBpe(docs, { vocabSize: 350 });
    const t2 = await trainBpe([...docs].reverse(), { vocabSize: 350 });
    const t3 = await trainBpe(
      (async function* () {
        yield* docs;
      })(),
      { vocabSize: 350 },
    );
    const j1 = JSON.stringify(t1.toTokenizerJson());
    expect(JSON.stringify(t2.toTokenizerJson())).toBe(j1);
    expect(JSON.stringify(t3.toTokenizerJson())).toBe(j1);
  });

  it('compresses its training text well below one token per byte and round-trips it', async () => {
    const docs = corpus(3, 400);
    const text = docs.join('\n');
    const t = await trainBpe(docs, { vocabSize: 600, specialTokens: ['<|bos|>', '<|eos|>'], bosToken: '<|bos|>', eosToken: '<|eos|>' });
    expect(t.vocabSize).toBeLessThanOrEqual(600);
    expect(t.bosId).toBe(t.vocabSize - 2);
    expect(t.eosId).toBe(t.vocabSize - 1);
    const ids = t.encode(text);
    expect(ids.length).toBeLessThan(Buffer.byteLength(text) / 3);
    expect(t.decode(ids)).toBe(text);
    for (let id = 0; id < 256; id++) expect(Array.from(t.tokenBytes(id))).toEqual([id]);
  });

  it('reaches the requested vocab size exactly when the data allows', async () => {
    const t = await trainBpe(corpus(4, 500), { vocabSize: 300, specialTokens: ['<s>'], minFrequency: 1 });
    expect(t.vocabSize).toBe(300);
    expect(t.numMerges).toBeGreaterThanOrEqual(43);
  });

  it('special tokens in training text are not merged into words', async () => {
    const docs = Array.from({ length: 50 }, () => '<|eos|>hello<|eos|>');
    const t = await trainBpe(docs, { vocabSize: 400, specialTokens: ['<|eos|>'] });
    expect(toks(t, t.encode('<|eos|>hello'))).toEqual(['<|eos|>', 'hello']);
    expect(t.tokenToId(bl('<|'))).toBeUndefined();
  });

  it('progress, abort and argument errors', async () => {
    const seen: number[] = [];
    await trainBpe(corpus(5, 100), { vocabSize: 320, onProgress: (p) => seen.push(p) });
    expect(seen.length).toBeGreaterThan(0);
    expect(seen[seen.length - 1]).toBe(1);
    expect(seen.every((p, i) => i === 0 || p >= seen[i - 1])).toBe(true);
    const ac = new AbortController();
    ac.abort();
    await expect(trainBpe(corpus(5, 10), { vocabSize: 300, signal: ac.signal })).rejects.toBeInstanceOf(AbortError);
    await expect(trainBpe(['x'], { vocabSize: 100 })).rejects.toBeInstanceOf(ArgumentError);
    await expect(trainBpe(['x'], { vocabSize: 300, bosToken: '<s>' })).rejects.toThrow(/must be one of specialTokens/);
    await expect(trainBpe(['abc'], { vocabSize: 300 })).rejects.toThrow(/no pair reached minFrequency/);
  });
});

describe('round trips', () => {
  it('decode(encode(s)) === s for random Unicode strings (fixture and trained tokenizers)', async () => {
    const r = rng(42);
    const trained = await trainBpe(
      Array.from({ length: 200 }, () => randomUnicode(r, 200)),
      { vocabSize: 700 },
    );
    const fixture = loadTokenizerJson(readFixture(PAIRS));
    for (let i = 0; i < 300; i++) {
      const s = randomUnicode(r, 1 + Math.floor(r() * 300));
      for (const t of [fixture, trained]) {
        const ids = t.encode(s);
        expect(t.decode(ids)).toBe(s);
      }
    }
    const edge = ['', ' ', '\r\n', ' '.repeat(10_000), 'a' + ' '.repeat(5000) + 'b', '👩‍👩‍👧‍👦', '日本語のテキスト', '\u0000\u0001\u007f', 'x\u00ad\ufeffy'];
    for (const s of edge) for (const t of [fixture, trained]) expect(t.decode(t.encode(s))).toBe(s);
  });

  it('save -> load reproduces the tokenizer (tokenizer.json + tokenizer_config.json)', async () => {
    const docs = corpus(6, 300);
    const t = await trainBpe(docs, { vocabSize: 500, specialTokens: ['<|begin_of_text|>', '<|end_of_text|>'], bosToken: '<|begin_of_text|>', eosToken: '<|end_of_text|>' });
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-tok-'));
    t.save(path.join(d, 'tokenizer.json'));
    const j = JSON.parse(fs.readFileSync(path.join(d, 'tokenizer.json'), 'utf8'));
    expect(j.model.type).toBe('BPE');
    expect(Array.isArray(j.model.merges[0])).toBe(true);
    expect(j.pre_tokenizer.pretokenizers.map((p: { type: string }) => p.type)).toEqual(['Split', 'ByteLevel']);
    expect(j.decoder.type).toBe('ByteLevel');
    const cfg = JSON.parse(fs.readFileSync(path.join(d, 'tokenizer_config.json'), 'utf8'));
    expect(cfg.bos_token).toBe('<|begin_of_text|>');
    const u = loadTokenizerFile(d);
    expect(u.vocabSize).toBe(t.vocabSize);
    expect(u.bosId).toBe(t.bosId);
    expect(u.eosId).toBe(t.eosId);
    const text = docs.slice(0, 50).join('<|end_of_text|>');
    expect(Array.from(u.encode(text, { addSpecial: true }))).toEqual(Array.from(t.encode(text, { addSpecial: true })));
    expect(JSON.stringify(u.toTokenizerJson())).toBe(JSON.stringify(t.toTokenizerJson()));
    // The fixture written back in pair form loads to the same encodings.
    const f = loadTokenizerJson(readFixture(STRINGS));
    const f2 = loadTokenizerJson(f.toTokenizerJson());
    expect(Array.from(f2.encode('the lowest her'))).toEqual(Array.from(f.encode('the lowest her')));
    fs.rmSync(d, { recursive: true });
  });
});
