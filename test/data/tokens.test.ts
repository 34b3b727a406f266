// Token store: encodeFiles against direct tokenizer.encode calls, the .btok format against an
// independent byte-level reading of its header, the cache's invalidation rules, and splitCorpus.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AbortError, ArgumentError, FormatError, ShapeError, TokenRangeError } from '../../lib/errors.js';
import { loadTokenizerFile, type BpeTokenizer } from '../../lib/tokenizer/bpe.js';
import {
  concatCorpora,
  corpusFromDocuments,
  documentRange,
  encodeFiles,
  loadTokens,
  saveTokens,
  splitCorpus,
  validateCorpus,
  type EncodeProgress,
  type TokenCorpus,
} from '../../lib/data/tokens.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const tok: BpeTokenizer = loadTokenizerFile(path.join(here, '..', 'fixtures', 'tokenizer', 'tiny.merges-strings.tokenizer.json'));
let dir = '';

const TEXTS = [
  'The quick brown fox jumps over the lazy dog.\nA second line.\n\nA new paragraph here.\n',
  'déjà vu — 東京 🚀 naïve café\r\nline two\r\n',
  '   \n\t\n', // whitespace only: no document
  'def f(x):\n    return x * 2\n\n\n\nprint(f(21))',
];

function writeFiles(names: string[], texts: string[]): string[] {
  return names.map((n, i) => {
    const f = path.join(dir, n);
    fs.writeFileSync(f, texts[i]);
    return f;
  });
}

/** Documents of a corpus as arrays. */
function docs(c: TokenCorpus): number[][] {
  return Array.from({ length: c.docStarts.length }, (_, i) => {
    const [s, e] = documentRange(c, i);
    return Array.from(c.tokens.subarray(s, e));
  });
}

beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-tokens-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('encodeFiles', () => {
  it('one document per file: ids of tokenizer.encode + EOS (the tokenizer default), whitespace-only files dropped', async () => {
    const files = writeFiles(['a.txt', 'b.txt', 'c.txt', 'd.txt'], TEXTS);
    expect(tok.eosId).not.toBeNull();
    const c = await encodeFiles(tok, files);
    const want = [0, 1, 3].map((i) => [...tok.encode(TEXTS[i], { parseSpecial: false }), tok.eosId!]);
    expect(docs(c)).toEqual(want);
    expect(c.vocabSize).toBe(tok.vocabSize);
    expect(tok.decode(c.tokens.subarray(0, want[0].length - 1))).toBe(TEXTS[0]);
    validateCorpus(c);
  });

  it("splits on lines and on a RegExp, adds BOS, honours eosId: null", async () => {
    const files = writeFiles(['l1.txt', 'l2.txt'], [TEXTS[0], TEXTS[1]]);
    const lines = await encodeFiles(tok, files, { splitOn: 'line', eosId: null, bosId: tok.bosId });
    const wantLines = ['The quick brown fox jumps over the lazy dog.', 'A second line.', 'A new paragraph here.', 'déjà vu — 東京 🚀 naïve café', 'line two'];
    expect(docs(lines)).toEqual(wantLines.map((t) => [tok.bosId!, ...tok.encode(t)]));
    const paras = await encodeFiles(tok, [files[0]], { splitOn: /\n\s*\n/ });
    const wantParas = ['The quick brown fox jumps over the lazy dog.\nA second line.', 'A new paragraph here.\n'];
    expect(docs(paras)).toEqual(wantParas.map((t) => [...tok.encode(t), tok.eosId!]));
  });

  it('treats special-token text as text unless parseSpecial', async () => {
    const [f] = writeFiles(['sp.txt'], ['hi <|end_of_text|> there']);
    const plain = await encodeFiles(tok, [f], { eosId: null });
    expect(Array.from(plain.tokens)).not.toContain(tok.eosId);
    const special = await encodeFiles(tok, [f], { eosId: null, parseSpecial: true });
    expect(Array.from(special.tokens)).toContain(tok.eosId);
  });

  it('caches per file, re-encodes only what changed, and ignores a damaged cache file', async () => {
    const cacheDir = path.join(dir, 'cache');
    const files = writeFiles(['c1.txt', 'c2.txt'], [TEXTS[0], TEXTS[3]]);
    const seen: EncodeProgress[] = [];
    const first = await encodeFiles(tok, files, { cacheDir, onProgress: (p) => seen.push(p) });
    expect(seen.map((p) => p.fromCache)).toEqual([false, false]);
    expect(seen[1]).toMatchObject({ filesDone: 2, files: 2, tokens: first.tokens.length, bytesDone: seen[1].bytes });
    const cached = fs.readdirSync(cacheDir).filter((f) => f.endsWith('.btok'));
    expect(cached.length).toBe(2);
    seen.length = 0;
    const again = await encodeFiles(tok, files, { cacheDir, onProgress: (p) => seen.push(p) });
    expect(seen.map((p) => p.fromCache)).toEqual([true, true]);
    expect(again).toEqual(first);
    // Change one file: only it is re-encoded, and the result is the fresh encoding.
    fs.writeFileSync(files[1], TEXTS[1]);
    seen.length = 0;
    const changed = await encodeFiles(tok, files, { cacheDir, onProgress: (p) => seen.push(p) });
    expect(seen.map((p) => p.fromCache)).toEqual([true, false]);
    expect(changed).toEqual(await encodeFiles(tok, files));
    // Other options -> other keys (a miss), not a stale hit.
    seen.length = 0;
    await encodeFiles(tok, files, { cacheDir, eosId: null, onProgress: (p) => seen.push(p) });
    expect(seen.map((p) => p.fromCache)).toEqual([false, false]);
    // Damage every cache file: results stay correct (re-encoded).
    for (const f of fs.readdirSync(cacheDir)) fs.writeFileSync(path.join(cacheDir, f), 'garbage');
    seen.length = 0;
    const repaired = await encodeFiles(tok, files, { cacheDir, onProgress: (p) => seen.push(p) });
    expect(seen.map((p) => p.fromCache)).toEqual([false, false]);
    expect(repaired).toEqual(changed);
  });

  it('reports bad input with typed errors naming the file or option', async () => {
    const [bad] = writeFiles(['bad.txt'], ['']);
    fs.writeFileSync(bad, Buffer.from([0x61, 0xff, 0xfe, 0x62]));
    await expect(encodeFiles(tok, [bad])).rejects.toThrow(FormatError);
    await expect(encodeFiles(tok, [bad])).rejects.toThrow(/bad\.txt: not valid UTF-8/);
    const lossy = await encodeFiles(tok, [bad], { invalidUtf8: 'replace', eosId: null });
    expect(tok.decode(lossy.tokens)).toBe('a\ufffd\ufffdb');
    await expect(encodeFiles(tok, [path.join(dir, 'missing.txt')])).rejects.toThrow(/files\[0\] ".*missing\.txt"/);
    await expect(encodeFiles(tok, [dir])).rejects.toThrow(ArgumentError);
    await expect(encodeFiles(tok, [bad], { eosId: 1e6 })).rejects.toThrow(TokenRangeError);
    await expect(encodeFiles(tok, [bad], { splitOn: 'para' as never })).rejects.toThrow(/splitOn/);
    const ac = new AbortController();
    ac.abort();
    await expect(encodeFiles(tok, [bad], { signal: ac.signal })).rejects.toThrow(AbortError);
  });
});

describe('saveTokens / loadTokens', () => {
  function randomCorpus(N: number, V: number, D: number, seed: number): TokenCorpus {
    let s = seed;
    const r = (): number => ((s = (Math.imul(s, 1103515245) + 12345) >>> 0) / 2 ** 32);
    const cuts = new Set<number>([0]);
    while (cuts.size < D) cuts.add(Math.floor(r() * N));
    return {
      tokens: Int32Array.from({ length: N }, () => Math.floor(r() * V)),
      docStarts: Int32Array.from([...cuts].sort((a, b) => a - b)),
      vocabSize: V,
    };
  }

  it('round-trips u16 and i32 corpora, odd lengths and the empty corpus; the header reads back independently', async () => {
    const cases: [TokenCorpus, number][] = [
      [randomCorpus(1001, 272, 7, 1), 1],
      [randomCorpus(1000, 65536, 3, 2), 1],
      [randomCorpus(999, 128256, 5, 3), 2],
      [{ tokens: new Int32Array(0), docStarts: new Int32Array(0), vocabSize: 10 }, 1],
    ];
    for (const [c, dtype] of cases) {
      const f = path.join(dir, `rt-${c.vocabSize}-${c.tokens.length}.btok`);
      await saveTokens(f, c);
      expect(await loadTokens(f)).toEqual(c);
      const b = fs.readFileSync(f);
      const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
      expect(b.subarray(0, 8).toString('latin1')).toBe('BTSTOKEN');
      expect([dv.getUint32(8, true), dv.getUint32(12, true), dv.getUint32(16, true), dv.getUint32(20, true), dv.getUint32(24, true), dv.getUint32(28, true)]).toEqual([
        1,
        dtype,
        c.vocabSize,
        c.docStarts.length,
        c.tokens.length,
        0,
      ]);
      const elt = dtype === 1 ? 2 : 4;
      const idBytes = Math.ceil((c.tokens.length * elt) / 4) * 4;
      expect(b.length).toBe(32 + idBytes + 4 * c.docStarts.length);
      for (let i = 0; i < Math.min(50, c.tokens.length); i++) expect(dtype === 1 ? dv.getUint16(32 + 2 * i, true) : dv.getInt32(32 + 4 * i, true)).toBe(c.tokens[i]);
    }
    const forced = path.join(dir, 'forced.btok');
    await saveTokens(forced, cases[0][0], { dtype: 'i32' });
    expect(fs.readFileSync(forced).readUInt32LE(12)).toBe(2);
    expect(await loadTokens(forced)).toEqual(cases[0][0]);
    await expect(saveTokens(forced, cases[2][0], { dtype: 'u16' })).rejects.toThrow(/u16.*65536/);
  });

  it('rejects damaged files with a FormatError naming the file and the field', async () => {
    const good = path.join(dir, 'good.btok');
    const c = randomCorpus(100, 300, 4, 9);
    await saveTokens(good, c);
    const orig = fs.readFileSync(good);
    const variant = async (name: string, mutate: (b: Buffer) => Buffer, re: RegExp): Promise<void> => {
      const f = path.join(dir, name);
      fs.writeFileSync(f, mutate(Buffer.from(orig)));
      await expect(loadTokens(f)).rejects.toThrow(FormatError);
      await expect(loadTokens(f)).rejects.toThrow(new RegExp(`${name}.*${re.source}`));
    };
    await variant('magic.btok', (b) => (b.write('XXXXXXXX', 0, 'latin1'), b), /bad magic/);
    await variant('version.btok', (b) => (b.writeUInt32LE(2, 8), b), /version 2/);
    await variant('dtype.btok', (b) => (b.writeUInt32LE(7, 12), b), /dtype code 7/);
    await variant('trunc.btok', (b) => b.subarray(0, b.length - 2), /bytes, the header/);
    await variant('extra.btok', (b) => Buffer.concat([b, Buffer.alloc(4)]), /bytes, the header/);
    await variant('short.btok', (b) => b.subarray(0, 10), /shorter than the 32-byte/);
    await variant('range.btok', (b) => (b.writeUInt32LE(200, 16), b), /tokens\[\d+\] = \d+ is outside \[0, vocabSize 200\)/);
    await variant('docs.btok', (b) => (b.writeInt32LE(5, b.length - 4 * c.docStarts.length), b), /docStarts must start with 0/);
    await variant('order.btok', (b) => (b.writeInt32LE(0, b.length - 4), b), /docStarts\[3\]/);
  });
});

describe('corpus helpers', () => {
  it('corpusFromDocuments / concatCorpora / validateCorpus', () => {
    const a = corpusFromDocuments([[1, 2], [], [3]], 10, { bosId: 8, eosId: 9 });
    expect(Array.from(a.tokens)).toEqual([8, 1, 2, 9, 8, 3, 9]);
    expect(Array.from(a.docStarts)).toEqual([0, 4]);
    const b = corpusFromDocuments([Int32Array.of(4, 5)], 10);
    const c = concatCorpora([a, b]);
    expect(Array.from(c.tokens)).toEqual([8, 1, 2, 9, 8, 3, 9, 4, 5]);
    expect(Array.from(c.docStarts)).toEqual([0, 4, 7]);
    expect(() => corpusFromDocuments([[10]], 10)).toThrow(TokenRangeError);
    expect(() => validateCorpus({ tokens: Int32Array.of(1, 2), docStarts: Int32Array.of(1), vocabSize: 5 })).toThrow(ShapeError);
    expect(() => validateCorpus({ tokens: [1] as never, docStarts: new Int32Array(0), vocabSize: 5 })).toThrow(ArgumentError);
    expect(() => concatCorpora([a, { ...b, vocabSize: 11 }])).toThrow(/vocabSize/);
  });
});

describe('splitCorpus', () => {
  // 40 documents of varied lengths, each made of a distinctive run of ids so documents can be traced.
  const lens = Array.from({ length: 40 }, (_, i) => 5 + ((i * 37) % 23));
  const corpus = corpusFromDocuments(
    lens.map((n, d) => Array.from({ length: n }, (_, j) => (d * 31 + j) % 1000)),
    1000,
  );
  const key = (d: number[]): string => d.join(',');

  it('puts whole documents on one side, reaches the fraction with at most one document of overshoot', () => {
    for (const f of [0.05, 0.1, 0.5, 0.9]) {
      const { train, heldOut, heldOutDocs } = splitCorpus(corpus, { heldOutFraction: f, seed: 3 });
      const all = docs(corpus).map(key);
      const tr = docs(train).map(key);
      const ho = docs(heldOut).map(key);
      expect([...tr, ...ho].sort()).toEqual([...all].sort()); // a partition of the documents
      expect(ho).toEqual(Array.from(heldOutDocs, (d) => all[d])); // in input order
      expect(tr.length).toBeGreaterThan(0);
      expect(ho.length).toBeGreaterThan(0);
      const N = corpus.tokens.length;
      expect(heldOut.tokens.length).toBeGreaterThanOrEqual(f * N);
      const lastLen = Math.max(...Array.from(heldOutDocs, (d) => lens[d]));
      expect(heldOut.tokens.length).toBeLessThan(f * N + lastLen);
      validateCorpus(train);
      validateCorpus(heldOut);
    }
  });

  it('is deterministic for a seed and differs across seeds', () => {
    const a = splitCorpus(corpus, { heldOutFraction: 0.2, seed: 1 });
    const b = splitCorpus(corpus, { heldOutFraction: 0.2, seed: 1 });
    const c = splitCorpus(corpus, { heldOutFraction: 0.2, seed: 2 });
    expect(a).toEqual(b);
    expect(Array.from(a.heldOutDocs)).not.toEqual(Array.from(c.heldOutDocs));
  });

  it('splits a single document by a tail, and handles fraction 0', () => {
    const one = corpusFromDocuments([Array.from({ length: 100 }, (_, i) => i)], 1000);
    const { train, heldOut } = splitCorpus(one, { heldOutFraction: 0.1 });
    expect(Array.from(train.tokens)).toEqual(Array.from({ length: 90 }, (_, i) => i));
    expect(Array.from(heldOut.tokens)).toEqual(Array.from({ length: 10 }, (_, i) => 90 + i));
    expect(Array.from(heldOut.docStarts)).toEqual([0]);
    const none = splitCorpus(corpus, { heldOutFraction: 0 });
    expect(none.train).toEqual(corpus);
    expect(none.heldOut.tokens.length).toBe(0);
    expect(() => splitCorpus(corpus, { heldOutFraction: 1 })).toThrow(/heldOutFraction must be in \[0, 1\)/);
  });
});
