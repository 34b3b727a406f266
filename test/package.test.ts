// Packaging: `npm pack`, then install the tarball into an empty folder with NO compiler, make or python
// on PATH: the install must use the bundled prebuild (prebuilds/linux-x64/), load it, and run an op.
// Needs `npm run prebuild` first (CI does it); skipped locally when there is no prebuild, failed in CI.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, mkdirSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { packageRoot } from '../lib/native.js';

const prebuildDir = join(packageRoot, 'prebuilds', `${process.platform}-${process.arch}`);
const havePrebuild = existsSync(prebuildDir) && readdirSync(prebuildDir).some((f) => f.endsWith('.node'));
const inCI = !!process.env.CI;

describe('package', () => {
  it('CI has a prebuild to pack', () => {
    if (inCI) expect(havePrebuild, `no prebuild in ${prebuildDir}: run npm run prebuild`).toBe(true);
  });

  it.skipIf(!havePrebuild)(
    'the packed tarball installs and runs from the prebuild on a machine without a compiler',
    () => {
      const work = mkdtempSync(join(tmpdir(), 'bts-pack-'));
      try {
        const npmCli = process.env.npm_execpath && existsSync(process.env.npm_execpath) ? process.env.npm_execpath : null;
        const npm = (args: string[], cwd: string, env: NodeJS.ProcessEnv = process.env) =>
          npmCli
            ? execFileSync(process.execPath, [npmCli, ...args], { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] }).toString()
            : execFileSync('npm', args, { cwd, env, stdio: ['ignore', 'pipe', 'pipe'] }).toString();
        const packOut = npm(['pack', '--json', '--pack-destination', work], packageRoot);
        const packInfo = JSON.parse(packOut.slice(packOut.indexOf('['))) as { filename: string; files: { path: string }[] }[];
        const files = packInfo[0].files.map((f) => f.path);
        expect(files.some((f) => f.startsWith('prebuilds/') && f.endsWith('.node'))).toBe(true);
        expect(files).toContain('dist/index.js');
        expect(files).toContain('binding.gyp');
        expect(files.some((f) => f.startsWith('test/') || f.startsWith('build/'))).toBe(false);

        // A PATH with node and sh (npm runs install scripts with sh) and nothing else: no cc, g++,
        // make or python3, so only a working prebuild can satisfy the install script.
        const bin = join(work, 'bin');
        mkdirSync(bin);
        symlinkSync(process.execPath, join(bin, 'node'));
        symlinkSync('/bin/sh', join(bin, 'sh'));
        const app = join(work, 'app');
        mkdirSync(app);
        writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', version: '1.0.0', type: 'module', private: true }));
        const env = { ...process.env, PATH: bin, CC: '/nonexistent/cc', CXX: '/nonexistent/c++' };
        delete env.BTS_NATIVE_PATH;
        const npmPath = npmCli ?? join(dirname(process.execPath), '..', 'lib', 'node_modules', 'npm', 'bin', 'npm-cli.js');
        execFileSync(process.execPath, [npmPath, 'install', '--no-audit', '--no-fund', join(work, packInfo[0].filename)], {
          cwd: app,
          env,
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        expect(existsSync(join(app, 'node_modules', 'branch-train-stitch', 'build'))).toBe(false);
        const script = `
          import { ops, info } from 'branch-train-stitch';
          const { out } = ops.rmsnormForward({ x: new Float32Array([3, 4]), weight: new Float32Array([1, 1]), eps: 0 });
          console.log(JSON.stringify({ binary: info().binary, simd: info().simd, out: Array.from(out) }));
        `;
        const res = JSON.parse(execFileSync(process.execPath, ['--input-type=module', '-e', script], { cwd: app, env }).toString());
        expect(res.binary).toContain('prebuilds');
        expect(res.out[0]).toBeCloseTo(3 / Math.sqrt(12.5), 5);
        const cli = execFileSync(join(app, 'node_modules', '.bin', 'bts'), ['info'], { cwd: app, env }).toString();
        expect(cli).toContain('simd');
      } finally {
        rmSync(work, { recursive: true, force: true });
      }
    },
    300_000,
  );
});
