/**
 * Atomic file writes: every file the package writes (weights, configs, tokenizers, checkpoints) goes
 * through here, so a crash or a full disk never leaves a half-written file under the target name.
 *
 * Protocol: write to a temp file in the *same directory* (`.<name>.<pid>.<random>.tmp`, so the
 * rename never crosses a filesystem), fsync it, rename it over the target, then fsync the directory
 * so the rename itself is durable. On any failure the temp file is removed and the error rethrown;
 * the previous content of the target (if any) is untouched.
 *
 * Known limits: directory fsync is a no-op on Windows (opening a directory fails there; we ignore
 * that error). The temp file is created with mode 0o666 minus umask, like fs.writeFile; the mode of
 * an existing target is not preserved.
 */
import * as fs from 'node:fs';
import * as fsp from 'node:fs/promises';
import * as path from 'node:path';
import { randomBytes } from 'node:crypto';
import { ArgumentError } from '../errors.js';

/** What can be written: one buffer / string, or a sequence of chunks written in order (no concatenation copy). */
export type AtomicData = string | Uint8Array | ArrayBufferView | readonly (string | Uint8Array | ArrayBufferView)[];

function tempPathFor(target: string): string {
  const dir = path.dirname(target);
  const base = path.basename(target);
  return path.join(dir, `.${base}.${process.pid}.${randomBytes(6).toString('hex')}.tmp`);
}

function toBytes(chunk: string | Uint8Array | ArrayBufferView): Uint8Array {
  if (typeof chunk === 'string') return Buffer.from(chunk, 'utf8');
  if (chunk instanceof Uint8Array) return chunk;
  if (!ArrayBuffer.isView(chunk)) throw new ArgumentError(`writeFileAtomic: a chunk must be a string or a typed array, got ${typeof chunk}`);
  return new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.byteLength);
}

function chunksOf(data: AtomicData): Uint8Array[] {
  if (Array.isArray(data)) return (data as readonly (string | Uint8Array | ArrayBufferView)[]).map(toBytes);
  return [toBytes(data as string | Uint8Array | ArrayBufferView)];
}

function fsyncDirSync(dir: string): void {
  let fd: number | undefined;
  try {
    fd = fs.openSync(dir, 'r');
    fs.fsyncSync(fd);
  } catch {
    // Windows cannot open directories; some filesystems refuse fsync on them. The rename is done.
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

async function fsyncDir(dir: string): Promise<void> {
  let h: fsp.FileHandle | undefined;
  try {
    h = await fsp.open(dir, 'r');
    await h.sync();
  } catch {
    // See fsyncDirSync.
  } finally {
    await h?.close();
  }
}

/**
 * Writes `data` to `target` atomically (temp file + fsync + rename + directory fsync). Synchronous.
 * @param target destination path; its directory must exist.
 * @param data a string (written as UTF-8), a byte view, or an array of those written in order.
 */
export function writeFileAtomic(target: string, data: AtomicData): void {
  const tmp = tempPathFor(target);
  let fd: number | undefined;
  try {
    fd = fs.openSync(tmp, 'wx');
    for (const c of chunksOf(data)) {
      let off = 0;
      while (off < c.byteLength) off += fs.writeSync(fd, c, off, c.byteLength - off);
    }
    fs.fsyncSync(fd);
    fs.closeSync(fd);
    fd = undefined;
    fs.renameSync(tmp, target);
  } catch (e) {
    if (fd !== undefined) {
      try {
        fs.closeSync(fd);
      } catch {
        /* already failing */
      }
    }
    try {
      fs.unlinkSync(tmp);
    } catch {
      /* never created or already renamed */
    }
    throw e;
  }
  fsyncDirSync(path.dirname(target));
}

/**
 * Async form of {@link writeFileAtomic}: same protocol, off the event loop. `data` may also be an
 * (async) iterable of chunks, so large files can be streamed without being built in memory.
 */
export async function writeFileAtomicAsync(
  target: string,
  data: AtomicData | Iterable<Uint8Array | string> | AsyncIterable<Uint8Array | string>,
): Promise<void> {
  const tmp = tempPathFor(target);
  let h: fsp.FileHandle | undefined;
  try {
    h = await fsp.open(tmp, 'wx');
    const write = async (c: Uint8Array): Promise<void> => {
      let off = 0;
      while (off < c.byteLength) off += (await h!.write(c, off, c.byteLength - off)).bytesWritten;
    };
    if (typeof data === 'string' || ArrayBuffer.isView(data) || Array.isArray(data)) {
      for (const c of chunksOf(data as AtomicData)) await write(c);
    } else if (Symbol.asyncIterator in (data as object)) {
      for await (const c of data as AsyncIterable<Uint8Array | string>) await write(toBytes(c));
    } else {
      for (const c of data as Iterable<Uint8Array | string>) await write(toBytes(c));
    }
    await h.sync();
    await h.close();
    h = undefined;
    await fsp.rename(tmp, target);
  } catch (e) {
    if (h !== undefined) await h.close().catch(() => undefined);
    await fsp.unlink(tmp).catch(() => undefined);
    throw e;
  }
  await fsyncDir(path.dirname(target));
}

/** Copies `source` to `target` atomically (streamed through {@link writeFileAtomicAsync}). */
export async function copyFileAtomic(source: string, target: string): Promise<void> {
  await writeFileAtomicAsync(target, fs.createReadStream(source) as AsyncIterable<Uint8Array>);
}
