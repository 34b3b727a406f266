// A small, strict XML 1.0 well-formedness checker and parser for the SVG tests (no DTDs, no CDATA,
// no processing instructions other than the leading declaration). Throws on any fault with its
// offset; returns the element tree with entities decoded, so tests can compare text round trips.

export interface XmlElement {
  name: string;
  attrs: Record<string, string>;
  children: (XmlElement | string)[];
}

const NAME = /^[A-Za-z_:][A-Za-z0-9_:.-]*/;
const INVALID_CHAR = /[\u0000-\u0008\u000B\u000C\u000E-\u001F\uFFFE\uFFFF]|[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/;

function decodeEntities(s: string, at: number): string {
  return s.replace(/&([^;&<]*);|&/g, (m, body: string | undefined) => {
    if (body === undefined) throw new Error(`XML: bare '&' near offset ${at}`);
    const named: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };
    if (body in named) return named[body];
    const num = /^#(\d+)$/.exec(body) ?? /^#x([0-9a-fA-F]+)$/.exec(body);
    if (num) {
      const cp = parseInt(num[1], body[1] === 'x' ? 16 : 10);
      if (cp === 0 || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) throw new Error(`XML: invalid character reference ${m} near offset ${at}`);
      return String.fromCodePoint(cp);
    }
    throw new Error(`XML: unknown entity ${m} near offset ${at}`);
  });
}

/** Parses `src` strictly; throws an Error describing the first fault. */
export function parseXml(src: string): XmlElement {
  const bad = INVALID_CHAR.exec(src);
  if (bad) throw new Error(`XML: character U+${bad[0].charCodeAt(0).toString(16)} is not allowed (offset ${bad.index})`);
  let i = 0;
  const decl = /^<\?xml\s+version="1\.0"(\s+encoding="UTF-8")?\s*\?>/.exec(src);
  if (decl) i = decl[0].length;
  const stack: XmlElement[] = [];
  let root: XmlElement | null = null;
  while (i < src.length) {
    if (src.startsWith('<!--', i)) {
      const end = src.indexOf('-->', i + 4);
      if (end < 0) throw new Error(`XML: unterminated comment at ${i}`);
      i = end + 3;
      continue;
    }
    if (src[i] === '<') {
      if (src[i + 1] === '/') {
        const m = NAME.exec(src.slice(i + 2));
        if (!m) throw new Error(`XML: bad end tag at ${i}`);
        const j = i + 2 + m[0].length;
        const close = /^\s*>/.exec(src.slice(j));
        if (!close) throw new Error(`XML: bad end tag </${m[0]} at ${i}`);
        const open = stack.pop();
        if (!open || open.name !== m[0]) throw new Error(`XML: </${m[0]}> at ${i} does not close <${open?.name ?? '(nothing)'}>`);
        i = j + close[0].length;
        if (stack.length === 0) root = open;
        continue;
      }
      const m = NAME.exec(src.slice(i + 1));
      if (!m) throw new Error(`XML: bad start tag at ${i}`);
      if (root !== null && stack.length === 0) throw new Error(`XML: second root element <${m[0]}> at ${i}`);
      const el: XmlElement = { name: m[0], attrs: {}, children: [] };
      let j = i + 1 + m[0].length;
      for (;;) {
        const ws = /^\s*/.exec(src.slice(j))![0].length;
        j += ws;
        if (src.startsWith('/>', j) || src[j] === '>') break;
        if (ws === 0) throw new Error(`XML: missing space before attribute in <${el.name}> at ${j}`);
        const a = /^([A-Za-z_:][A-Za-z0-9_:.-]*)\s*=\s*("([^"<]*)"|'([^'<]*)')/.exec(src.slice(j));
        if (!a) throw new Error(`XML: bad attribute in <${el.name}> at ${j}: ${JSON.stringify(src.slice(j, j + 30))}`);
        if (a[1] in el.attrs) throw new Error(`XML: duplicate attribute ${a[1]} in <${el.name}> at ${j}`);
        el.attrs[a[1]] = decodeEntities(a[3] ?? a[4], j);
        j += a[0].length;
      }
      if (stack.length) stack[stack.length - 1].children.push(el);
      if (src.startsWith('/>', j)) {
        i = j + 2;
        if (stack.length === 0) root = el;
      } else {
        stack.push(el);
        i = j + 1;
      }
      continue;
    }
    const next = src.indexOf('<', i);
    const raw = src.slice(i, next < 0 ? src.length : next);
    if (stack.length === 0) {
      if (raw.trim() !== '') throw new Error(`XML: text outside the root element at ${i}: ${JSON.stringify(raw.slice(0, 20))}`);
    } else {
      stack[stack.length - 1].children.push(decodeEntities(raw, i));
    }
    i = next < 0 ? src.length : next;
  }
  if (stack.length) throw new Error(`XML: <${stack[stack.length - 1].name}> is never closed`);
  if (!root) throw new Error('XML: no root element');
  return root;
}

/** All elements of a tree, depth first. */
export function elements(root: XmlElement): XmlElement[] {
  const out: XmlElement[] = [root];
  for (const c of root.children) if (typeof c !== 'string') out.push(...elements(c));
  return out;
}

/** The concatenated text content of an element. */
export function textOf(el: XmlElement): string {
  return el.children.map((c) => (typeof c === 'string' ? c : textOf(c))).join('');
}
