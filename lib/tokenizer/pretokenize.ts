/**
 * Byte-level pre-tokenization pieces shared by the BPE tokenizer and its trainer:
 * GPT-2's `bytes_to_unicode` alphabet, the Llama 3 / GPT-2 split patterns, and a translator from the
 * Oniguruma / Rust-regex dialect found in `tokenizer.json` to a JS `RegExp`.
 *
 * Regex dialect notes (why the patterns are rewritten rather than copied):
 * - `(?i:...)` scoped flags do not exist in JS before ES2025 / Node 23; the group is expanded by hand
 *   (`'s` -> `'[sSſ]`, since Unicode case folding also matches U+017F LONG S).
 * - `\s` in JS includes U+FEFF and excludes U+0085; Rust regex and Oniguruma use Unicode White_Space.
 *   `\s` / `\S` are therefore rewritten to `\p{White_Space}` / `\P{White_Space}` (inside classes too).
 *
 * Known limits: patterns using possessive quantifiers, atomic groups or other Oniguruma-only syntax
 * fail to compile and are reported as unsupported.
 */
import { UnsupportedFeatureError } from '../errors.js';

/** The Llama 3 pre-tokenizer pattern exactly as it appears in tokenizer.json (Oniguruma syntax). */
export const LLAMA3_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

/** GPT-2's pattern, used by the ByteLevel pre-tokenizer when `use_regex` is true. */
export const GPT2_PATTERN = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/** Extra characters a Unicode case-insensitive match of an ASCII letter also accepts. */
const FOLD_EXTRA: Record<string, string> = { s: 'ſ', k: 'K' };

function expandCaseInsensitive(body: string, pattern: string): string {
  let out = '';
  let inClass = false;
  for (let i = 0; i < body.length; i++) {
    const c = body[i];
    if (c === '\\') {
      // Copy escapes whole, including `\p{L}`, `\x{..}`, `\u{..}` (their letters are not literals).
      const close = body[i + 2] === '{' ? body.indexOf('}', i + 2) : -1;
      const end = close >= 0 ? close + 1 : i + 2;
      out += body.slice(i, end);
      i = end - 1;
      continue;
    }
    if (c === '[') inClass = true;
    else if (c === ']') inClass = false;
    if (/[A-Za-z]/.test(c)) {
      const lo = c.toLowerCase();
      const both = `${lo}${lo.toUpperCase()}${FOLD_EXTRA[lo] ?? ''}`;
      out += inClass ? both : `[${both}]`;
    } else if (c === '(' && body[i + 1] === '?' && /[a-z-]/.test(body[i + 2] ?? '') && !inClass) {
      throw new UnsupportedFeatureError(`pre-tokenizer regex ${JSON.stringify(pattern)}: nested inline flags are not supported`);
    } else {
      out += c;
    }
  }
  return out;
}

/**
 * Translates a tokenizer.json regex (Oniguruma / Rust syntax) to a JS RegExp with flags `gu`.
 * @throws UnsupportedFeatureError when the pattern uses syntax JS cannot express.
 */
export function compilePattern(pattern: string): RegExp {
  let out = '';
  for (let i = 0; i < pattern.length; i++) {
    const c = pattern[i];
    if (c === '\\') {
      const n = pattern[i + 1];
      if (n === 's') out += '\\p{White_Space}';
      else if (n === 'S') out += '\\P{White_Space}';
      else out += c + (n ?? '');
      i++;
      continue;
    }
    if (c === '(' && pattern.startsWith('(?i:', i)) {
      // Find the matching ')' of this group.
      let depth = 0;
      let j = i;
      let inClass = false;
      for (; j < pattern.length; j++) {
        const d = pattern[j];
        if (d === '\\') {
          j++;
          continue;
        }
        if (inClass) {
          if (d === ']') inClass = false;
          continue;
        }
        if (d === '[') inClass = true;
        else if (d === '(') depth++;
        else if (d === ')' && --depth === 0) break;
      }
      if (j >= pattern.length) throw new UnsupportedFeatureError(`pre-tokenizer regex ${JSON.stringify(pattern)}: unbalanced (?i: group`);
      const body = pattern.slice(i + 4, j);
      out += `(?:${compilePattern(expandCaseInsensitive(body, pattern)).source})`;
      i = j;
      continue;
    }
    out += c;
  }
  try {
    return new RegExp(out, 'gu');
  } catch (e) {
    throw new UnsupportedFeatureError(`pre-tokenizer regex ${JSON.stringify(pattern)} cannot be compiled as a JS regex (${(e as Error).message})`);
  }
}

/** The compiled Llama 3 pattern (global + unicode). */
export const LLAMA3_REGEX = compilePattern(LLAMA3_PATTERN);

/**
 * Splits `text` into pre-tokens with behaviour "Isolated": every match is a pre-token, and so is
 * any text between matches (none for patterns that cover every character, as Llama 3's does).
 */
export function splitIsolated(text: string, re: RegExp, out: string[] = []): string[] {
  re.lastIndex = 0;
  let last = 0;
  for (let m = re.exec(text); m !== null; m = re.exec(text)) {
    if (m[0].length === 0) {
      re.lastIndex++;
      continue;
    }
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(m[0]);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

/**
 * GPT-2's `bytes_to_unicode`: byte -> printable character. The 188 printable Latin-1 bytes map to
 * themselves; the other 68 map to U+0100 + k in byte order.
 */
export const BYTE_TO_CHAR: readonly string[] = (() => {
  const bs: number[] = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const table: string[] = new Array(256);
  for (const b of bs) table[b] = String.fromCharCode(b);
  let n = 0;
  for (let b = 0; b < 256; b++) if (table[b] === undefined) table[b] = String.fromCharCode(256 + n++);
  return table;
})();

/** Inverse of {@link BYTE_TO_CHAR}: char code -> byte, -1 for characters outside the alphabet. */
export const CHAR_TO_BYTE: Int16Array = (() => {
  const t = new Int16Array(512).fill(-1);
  BYTE_TO_CHAR.forEach((c, b) => (t[c.charCodeAt(0)] = b));
  return t;
})();

/** Bytes -> the byte-level string (one alphabet char per byte). */
export function bytesToByteLevel(bytes: Uint8Array): string {
  let s = '';
  for (let i = 0; i < bytes.length; i++) s += BYTE_TO_CHAR[bytes[i]];
  return s;
}

/** A byte-level string -> bytes; null when it holds a character outside the alphabet. */
export function byteLevelToBytes(s: string): Uint8Array | null {
  const out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) {
    const code = s.charCodeAt(i);
    const b = code < 512 ? CHAR_TO_BYTE[code] : -1;
    if (b < 0) return null;
    out[i] = b;
  }
  return out;
}
