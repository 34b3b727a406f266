/**
 * Text cleaning for the domain corpora: Unicode normalisation, control and ANSI stripping, exact
 * dedup by content hash and by line, minified/generated code detection, and the per-line language
 * filter that drops untranslated English from localised text.
 *
 * Why each step (../shared/DATA.md section 8 lists them in this order):
 * - NFC: the same word must be the same bytes whatever the source's normal form, or the tokenizer
 *   learns two spellings. CRLF becomes LF; C0 controls other than tab and newline go, which also
 *   frees U+001E (record separator) to separate documents in the output files.
 * - dedup by hash: npm packages ship the same file in several builds (rxjs cjs/esm), Debian help
 *   pages repeat across sections; a duplicated document would also leak between splits.
 * - dedup by line (prose only): navigation boilerplate repeated in every LibreOffice or GNOME page,
 *   and commentary entries repeated over verse ranges. Short lines (under `minLength` characters) are
 *   never dropped, so ordinary repeated lines ("Yes.", blank lines, list bullets) survive. Code is
 *   never line-deduplicated: it would break the syntax.
 * - minified/generated code: a model learns nothing useful from one 200 kB line or a Unicode table.
 * - language filter: "translated" documentation falls back to English paragraphs (45-86 % of some
 *   Debian handbooks), which would make the multilingual expert an English one.
 *
 * Known limits: the English detector is a stop-word ratio (the recipe measured in DATA.md); it keeps
 * short English lines (under 6 words) and may drop a foreign line full of English loan words. The
 * script test only applies to languages with their own script (zh, ja, ko, ru, uk, bg, el, ar, ...).
 */
import { createHash } from 'node:crypto';

/** Hex sha256 of a string's UTF-8 bytes or of a buffer. */
export function sha256(data: string | Uint8Array): string {
  return createHash('sha256').update(data).digest('hex');
}

const ANSI = /\x1b\[[0-9;?]*[ -/]*[@-~]/g;
// C0 controls except \t (09) and \n (0a), DEL, C1 controls, BOM / zero-width no-break space.
const CONTROLS = /[\x00-\x08\x0b-\x1f\x7f-\x9f\ufeff]/g;

/**
 * Normalises one document: NFC, CRLF/CR to LF, ANSI escape sequences and control characters removed
 * (tab and newline kept), backspace overstrikes ("X\bX", "_\bX" from man) resolved, trailing blanks
 * removed from every line, runs of more than two blank lines collapsed, leading/trailing blank lines
 * trimmed. Indentation is kept (code needs it).
 */
export function normalizeText(text: string): string {
  let s = text.replace(/\r\n?/g, '\n');
  // Overstrike sequences (bold "a\ba", underline "_\ba") as left by nroff: keep the last character.
  if (s.includes('\b')) s = s.replace(/[^\n]\x08/g, '');
  s = s.replace(ANSI, '').replace(CONTROLS, '');
  s = s.normalize('NFC');
  s = s.replace(/[ \t\u00a0]+$/gm, '');
  s = s.replace(/\n{4,}/g, '\n\n\n');
  return s.replace(/^\n+/, '').replace(/\s+$/, '');
}

/** Keeps the first document of every exact duplicate (after normalisation) in input order. */
export function dedupByHash<T extends { text: string }>(docs: Iterable<T>, seen: Set<string> = new Set()): T[] {
  const out: T[] = [];
  for (const d of docs) {
    const h = sha256(d.text);
    if (seen.has(h)) continue;
    seen.add(h);
    out.push(d);
  }
  return out;
}

/** Options of {@link dedupLines}. */
export interface LineDedupOptions {
  /** Lines shorter than this (after trimming, in characters) are never dropped. Default 40. */
  minLength?: number;
  /** Shared set of seen line hashes, to dedup across several calls (e.g. a whole source). */
  seen?: Set<string>;
}

/**
 * Drops every line (trimmed length >= minLength) already seen earlier in this text or in `seen`.
 * Returns the text without those lines.
 */
export function dedupLines(text: string, options: LineDedupOptions = {}): string {
  const minLength = options.minLength ?? 40;
  const seen = options.seen ?? new Set<string>();
  const out: string[] = [];
  for (const line of text.split('\n')) {
    const t = line.trim();
    if (t.length >= minLength) {
      const h = sha256(t);
      if (seen.has(h)) continue;
      seen.add(h);
    }
    out.push(line);
  }
  return out.join('\n');
}

/**
 * Why a code file must not be used, or null when it looks hand-written. Heuristics: a `.min.`
 * file name; a `sourceMappingURL` comment (compiled output); a generated-code marker in the first
 * 2,000 characters ("@generated", "DO NOT EDIT", "Code generated", "auto-generated"); a line longer
 * than 1,000 characters; a mean line length above 200; under 8 % whitespace in a file over 1 kB.
 */
export function minifiedOrGeneratedReason(path: string, text: string): string | null {
  const base = path.split('/').pop() ?? path;
  if (/\.min\.[a-z]+$/i.test(base) || /[-.]min\.(m|c)?js$/i.test(base)) return 'minified file name';
  if (/[#@]\s*sourceMappingURL=/.test(text)) return 'sourceMappingURL (compiled output)';
  const head = text.slice(0, 2000);
  if (/@generated\b|DO NOT EDIT|Code generated .* DO NOT EDIT|\bauto-?generated\b|automatically generated/i.test(head)) return 'generated-code marker';
  const lines = text.split('\n');
  let longest = 0;
  for (const l of lines) if (l.length > longest) longest = l.length;
  if (longest > 1000) return `a line of ${longest} characters`;
  if (text.length / Math.max(1, lines.length) > 200) return 'mean line length over 200';
  if (text.length > 1000) {
    let ws = 0;
    for (let i = 0; i < text.length; i++) {
      const c = text.charCodeAt(i);
      if (c === 32 || c === 9 || c === 10) ws++;
    }
    if (ws / text.length < 0.08) return 'under 8% whitespace';
  }
  return null;
}

const EN_STOP = new Set('the and of to is in that for with this you are be it on as by can from or an which not your'.split(' '));

/**
 * True when a line reads as English: at least 6 Latin-letter words of which more than 20 % are
 * among the 25 commonest English function words (the detector measured in ../shared/DATA.md).
 */
export function looksEnglish(line: string): boolean {
  const words = line.toLowerCase().match(/[a-z]+/g);
  if (!words || words.length < 6) return false;
  let n = 0;
  for (const w of words) if (EN_STOP.has(w)) n++;
  return n / words.length > 0.2;
}

/** Script of the languages written in their own script (regex matching one letter of it). */
const SCRIPTS: Record<string, RegExp> = {
  zh: /[\u3400-\u9fff\uf900-\ufaff]/u,
  lzh: /[\u3400-\u9fff\uf900-\ufaff]/u,
  ja: /[\u3040-\u30ff\u3400-\u9fff]/u,
  ko: /[\uac00-\ud7af\u1100-\u11ff]/u,
  ru: /[\u0400-\u04ff]/u,
  uk: /[\u0400-\u04ff]/u,
  bg: /[\u0400-\u04ff]/u,
  sr: /[\u0400-\u04ff]/u,
  mk: /[\u0400-\u04ff]/u,
  el: /[\u0370-\u03ff\u1f00-\u1fff]/u,
  ar: /[\u0600-\u06ff]/u,
  ur: /[\u0600-\u06ff]/u,
  fa: /[\u0600-\u06ff]/u,
  he: /[\u0590-\u05ff]/u,
  bn: /[\u0980-\u09ff]/u,
  hi: /[\u0900-\u097f]/u,
  th: /[\u0e00-\u0e7f]/u,
};

/** Language code without region ("zh-cn" -> "zh", "pt_BR" -> "pt"). */
export function baseLanguage(lang: string): string {
  return lang.toLowerCase().split(/[-_]/)[0];
}

/**
 * True when a line must be dropped from text in language `lang`: it looks English
 * ({@link looksEnglish}), or, for a language with its own script, it has at least 3 Latin words
 * and more Latin letters than letters of that script (an untranslated or code line).
 */
export function isForeignLine(line: string, lang: string): boolean {
  const base = baseLanguage(lang);
  if (base === 'en') return false;
  if (looksEnglish(line)) return true;
  const script = SCRIPTS[base];
  if (!script) return false;
  const latinWords = line.match(/[A-Za-z]{2,}/g);
  if (!latinWords || latinWords.length < 3) return false;
  let latin = 0;
  let own = 0;
  for (const ch of line) {
    if (/[A-Za-z]/.test(ch)) latin++;
    else if (script.test(ch)) own++;
  }
  return latin > own;
}

/** Removes the lines of `text` that {@link isForeignLine} flags for `lang`; returns the rest. */
export function filterLanguage(text: string, lang: string): string {
  return text
    .split('\n')
    .filter((l) => !isForeignLine(l, lang))
    .join('\n');
}

/**
 * Cleans one mailing-list e-mail body: drops quoted replies (lines starting with ">"), the
 * "On ... wrote:" lines that introduce them, the signature after a "-- " line, list footers after a
 * line of underscores, and URLs.
 */
export function cleanEmailBody(body: string): string {
  const out: string[] = [];
  for (const line of body.split('\n')) {
    if (/^-- ?$/.test(line) || /^_{10,}\s*$/.test(line)) break;
    if (/^\s*>/.test(line)) continue;
    if (/^On .+wrote:\s*$/.test(line) || /^\S+@\S+ (said|wrote):?\s*$/.test(line)) continue;
    out.push(line.replace(/\b(?:https?|ftp):\/\/\S+/g, '').replace(/\bwww\.\S+/g, ''));
  }
  return out.join('\n');
}
