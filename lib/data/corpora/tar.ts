/**
 * A streaming reader for .tar.gz archives (npm package tarballs), so a corpus source can take the
 * few files it needs out of a large package (chinese-poetry unpacks to 350 MB) without writing the
 * rest to disk and without a tar dependency or a `tar` program.
 *
 * Handles ustar headers (name + prefix), pax extended headers (`path=` records, type 'x'; global
 * headers 'g' are skipped) and GNU long names (type 'L'). Only regular files are returned;
 * directories, links and devices are skipped (npm tarballs hold regular files only).
 *
 * Safety: an entry path that is absolute or contains a `..` segment is refused with a FormatError
 * (a tarball must not write outside its destination). Memory: only the selected files' bodies are
 * buffered, one at a time.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createGunzip } from 'node:zlib';
import { FormatError } from '../../errors.js';

/** One regular file of an archive. */
export interface TarEntry {
  /** Path inside the archive, '/'-separated, after stripping `strip` leading components. */
  path: string;
  /** File contents. */
  data: Buffer;
}

function field(b: Buffer, off: number, len: number): string {
  const end = b.indexOf(0, off);
  return b.toString('utf8', off, end >= 0 && end < off + len ? end : off + len);
}

function octal(b: Buffer, off: number, len: number, file: string): number {
  // GNU base-256 for sizes >= 8 GiB: high bit of the first byte set.
  if (b[off] & 0x80) {
    let v = 0;
    for (let i = off + 1; i < off + len; i++) v = v * 256 + b[i];
    return v;
  }
  const s = field(b, off, len).trim();
  if (s === '') return 0;
  if (!/^[0-7]+$/.test(s)) throw new FormatError(`${file}: bad octal field '${s}' in a tar header`);
  return parseInt(s, 8);
}

function parsePax(data: Buffer): Record<string, string> {
  const out: Record<string, string> = {};
  let i = 0;
  while (i < data.length) {
    const sp = data.indexOf(0x20, i);
    if (sp < 0) break;
    const len = parseInt(data.toString('utf8', i, sp), 10);
    if (!Number.isFinite(len) || len <= 0) break;
    const rec = data.toString('utf8', sp + 1, i + len - 1); // drop the trailing newline
    const eq = rec.indexOf('=');
    if (eq > 0) out[rec.slice(0, eq)] = rec.slice(eq + 1);
    i += len;
  }
  return out;
}

function safePath(p: string, file: string): string {
  const norm = p.replace(/\\/g, '/').replace(/^\.\//, '');
  if (norm.startsWith('/') || norm.split('/').includes('..')) throw new FormatError(`${file}: unsafe path '${p}' in the archive`);
  return norm;
}

/**
 * Reads the regular files of a .tar.gz whose (stripped) path passes `include`, in archive order.
 * @param file path of the .tgz / .tar.gz.
 * @param include predicate on the stripped path; files it rejects are skipped without buffering.
 * @param strip leading path components to remove (npm tarballs: 1, the `package/` folder).
 * @throws FormatError on a corrupt or truncated archive or an unsafe path.
 */
export async function* readTarGz(file: string, include: (p: string) => boolean = () => true, strip = 0): AsyncGenerator<TarEntry> {
  const input = fs.createReadStream(file).pipe(createGunzip());
  let buf: Buffer = Buffer.alloc(0);
  let need = 512;
  let state: 'header' | 'body' = 'header';
  let bodySize = 0;
  let padded = 0;
  let type = '0';
  let name = '';
  let longName: string | null = null;
  let paxPath: string | null = null;
  let keep = false;
  let zeroBlocks = 0;
  try {
    // Pending input is a list of chunks, joined only once enough bytes for the next step arrived
    // (joining on every chunk would be quadratic in the size of a large file).
    let pending: Buffer[] = [];
    let pendingBytes = 0;
    for await (const chunk of input as AsyncIterable<Buffer>) {
      pending.push(chunk);
      pendingBytes += chunk.length;
      if (buf.length + pendingBytes < need) continue;
      buf = Buffer.concat([buf, ...pending]);
      pending = [];
      pendingBytes = 0;
      while (buf.length >= need) {
        if (state === 'header') {
          const h = buf.subarray(0, 512);
          buf = buf.subarray(512);
          if (h.every((x) => x === 0)) {
            zeroBlocks++;
            need = 512;
            continue;
          }
          zeroBlocks = 0;
          const stored = octal(h, 148, 8, file);
          let sum = 0;
          for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 32 : h[i];
          if (sum !== stored) throw new FormatError(`${file}: tar header checksum mismatch (expected ${stored}, computed ${sum})`);
          bodySize = octal(h, 124, 12, file);
          type = String.fromCharCode(h[156] || 0x30);
          const prefix = field(h, 257, 6).startsWith('ustar') ? field(h, 345, 155) : '';
          name = prefix ? `${prefix}/${field(h, 0, 100)}` : field(h, 0, 100);
          if (longName !== null) name = longName;
          if (paxPath !== null) name = paxPath;
          padded = Math.ceil(bodySize / 512) * 512;
          const isMeta = type === 'x' || type === 'g' || type === 'L';
          if (!isMeta) {
            longName = null;
            paxPath = null;
          }
          keep = isMeta || ((type === '0' || type === '\0' || type === '7') && (() => {
            const parts = safePath(name, file).split('/').filter((x) => x !== '');
            const stripped = parts.slice(strip).join('/');
            return stripped !== '' && include(stripped);
          })());
          state = 'body';
          need = padded;
        } else {
          const body = buf.subarray(0, bodySize);
          buf = buf.subarray(padded);
          state = 'header';
          need = 512;
          if (!keep) continue;
          if (type === 'x') {
            const pax = parsePax(body);
            if (pax.path !== undefined) paxPath = pax.path;
          } else if (type === 'L') {
            longName = field(body, 0, body.length);
          } else if (type !== 'g') {
            const parts = safePath(name, file).split('/').filter((x) => x !== '');
            yield { path: parts.slice(strip).join('/'), data: Buffer.from(body) };
          }
        }
      }
    }
  } catch (e) {
    if (e instanceof FormatError) throw e;
    throw new FormatError(`${file}: cannot read the archive (${(e as Error).message})`, { cause: e });
  }
  if (state === 'body' || (buf.length !== 0 && zeroBlocks === 0)) {
    throw new FormatError(`${file}: truncated tar archive`);
  }
}

/**
 * Extracts the selected regular files of a .tar.gz under `dest` (created when missing).
 * @returns the number of files and bytes written.
 */
export async function extractTarGz(file: string, dest: string, include: (p: string) => boolean = () => true, strip = 0): Promise<{ files: number; bytes: number }> {
  let files = 0;
  let bytes = 0;
  for await (const e of readTarGz(file, include, strip)) {
    const target = path.join(dest, e.path);
    await fs.promises.mkdir(path.dirname(target), { recursive: true });
    await fs.promises.writeFile(target, e.data);
    files++;
    bytes += e.data.length;
  }
  return { files, bytes };
}
