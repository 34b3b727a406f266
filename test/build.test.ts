// The shipped binary: portable code outside the ISA-specific kernels, every op registered, CLI works.
import { execFileSync, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { native, nativePath, packageRoot } from '../lib/native.js';
import { info, setSimdLevel, setThreads, simdLevels, ArgumentError, UnsupportedSimdError } from '../lib/index.js';

function hasObjdump(): boolean {
  return spawnSync('objdump', ['--version']).status === 0;
}

function isStripped(file: string): boolean {
  return spawnSync('nm', [file]).stderr.toString().includes('no symbols');
}

function hasNm(): boolean {
  return spawnSync('nm', ['--version']).status === 0;
}

function findObjects(dir: string): string[] {
  if (!existsSync(dir)) return [];
  const out: string[] = [];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    if (e.isDirectory()) out.push(...findObjects(p));
    else if (e.name.endsWith('.o')) out.push(p);
  }
  return out;
}

describe('build', () => {
  it.skipIf(!hasObjdump())('uses AVX instructions only inside the avx2/avx512 kernel copies', () => {
    // Outside bts::cpu::avx2 / avx512 functions: no VEX/EVEX instruction at all (mnemonics v...),
    // so baseline x86-64 CPUs can run it. Inside avx2 functions: no AVX-512 (zmm, mask registers,
    // xmm/ymm16-31). Needs function names, so it reads unstripped builds: a stripped prebuild would
    // attribute all local code to the nearest exported symbol. The stripped prebuild is linked from
    // the same objects, which the next test checks.
    const candidates = [
      nativePath(),
      join(packageRoot, 'build/Release/bts.node'),
      join(packageRoot, 'build/Release/obj.target/bts.node'),
      join(packageRoot, 'build-cmake/bts.node'),
    ].filter((f, i, all) => existsSync(f) && all.indexOf(f) === i && !isStripped(f));
    expect(candidates.length, 'no unstripped build of the addon to inspect').toBeGreaterThan(0);
    for (const file of candidates) {
      const asm = execFileSync('objdump', ['-d', '--no-show-raw-insn', '-C', file], { maxBuffer: 1 << 30 }).toString();
      const offenders = new Set<string>();
      let fn = '';
      for (const line of asm.split('\n')) {
        const m = /^[0-9a-f]+ <(.*)>:$/.exec(line);
        if (m) {
          fn = m[1];
          continue;
        }
        const insn = /^\s*[0-9a-f]+:\s+([a-z][a-z0-9.]*)\s*(.*)$/.exec(line);
        if (!insn) continue;
        const [, mnem, ops] = insn;
        const avx512 = /%zmm|%k[0-7]\b|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{%k/.test(ops);
        const vex = mnem.startsWith('v') && mnem !== 'verr' && mnem !== 'verw';
        if (fn.includes('avx512')) continue;
        if (fn.includes('avx2')) {
          if (avx512) offenders.add(`AVX-512 in ${fn}`);
        } else if (vex || avx512) offenders.add(`${mnem} in ${fn}`);
      }
      expect([...offenders].slice(0, 20), file).toEqual([]);
      expect(asm).toContain('bts::cpu::avx2::');
      expect(asm).toContain('bts::cpu::avx512::');
    }
  });

  it.skipIf(!hasNm())('ISA object files define no symbol shared with other levels (std templates etc.)', () => {
    // Any global or weak function an avx2/avx512 object defines outside its own namespace (for example
    // a std::vector<float> member instantiated in the ISA region) could be picked by the linker for
    // the whole program, AVX-512 instructions and all. Every such symbol must carry the level's name.
    const dirs: [string, string][] = [
      ['build/Release/obj.target/bts_cpu_avx2', 'avx2'],
      ['build/Release/obj.target/bts_cpu_avx512', 'avx512'],
      ['build-cmake/CMakeFiles/bts_cpu_l2.dir', 'avx2'],
      ['build-cmake/CMakeFiles/bts_cpu_l3.dir', 'avx512'],
    ];
    let checked = 0;
    const offenders: string[] = [];
    for (const [dir, level] of dirs) {
      for (const obj of findObjects(join(packageRoot, dir))) {
        checked++;
        const out = execFileSync('nm', ['-C', '--defined-only', '-g', obj], { maxBuffer: 1 << 28 }).toString();
        for (const line of out.split('\n')) {
          const m = /^[0-9a-f]+ ([TWi]) (.*)$/.exec(line);
          if (m && !m[2].includes(`::${level}::`)) offenders.push(`${obj.slice(packageRoot.length + 1)}: ${m[2]}`);
        }
      }
    }
    expect(checked, 'no ISA object files found: build the addon first').toBeGreaterThan(0);
    expect(offenders.slice(0, 20)).toEqual([]);
  });

  it('registers every op of the kernel library', () => {
    const names = native().listOps().map((o) => o.name).sort();
    expect(names).toEqual(
      [
        'adamw_step',
        'attention_backward',
        'attention_forward',
        'cross_entropy',
        'embedding_backward',
        'embedding_forward',
        'gemm_bf16',
        'gemm_f32',
        'rmsnorm_backward',
        'rmsnorm_forward',
        'rope_forward',
        'rope_table',
        'stitch_eh_backward',
        'stitch_eh_forward',
        'stitch_he_backward',
        'stitch_he_forward',
        'swiglu_backward',
        'swiglu_forward',
      ].sort(),
    );
  });

  it('reports and switches SIMD levels and threads', () => {
    const i = info();
    expect(i.simdLevels).toContain('reference');
    expect(i.simdLevels).toContain('scalar');
    expect(i.simd).toBe(i.bestSimd);
    for (const l of simdLevels()) {
      setSimdLevel(l);
      expect(info().simd).toBe(l);
    }
    setSimdLevel(i.bestSimd as never);
    if (!i.simdLevels.includes('avx512')) expect(() => setSimdLevel('avx512')).toThrow(UnsupportedSimdError);
    setThreads(1);
    expect(info().threads).toBe(1);
    setThreads(2);
    expect(info().threads).toBe(2);
    expect(() => setThreads(0)).toThrow(ArgumentError);
  });

  it('BTS_SIMD and BTS_THREADS are honoured by a fresh process (bts info)', () => {
    const out = execFileSync(process.execPath, ['--import', 'tsx', 'lib/cli.ts', 'info', '--json'], {
      env: { ...process.env, BTS_SIMD: 'scalar', BTS_THREADS: '1' },
    }).toString();
    const j = JSON.parse(out);
    expect(j.simd).toBe('scalar');
    expect(j.threads).toBe(1);
    const bad = spawnSync(process.execPath, ['--import', 'tsx', 'lib/cli.ts', 'nosuchcommand']);
    expect(bad.status).toBe(2);
    expect(bad.stderr.toString()).toContain("unknown command 'nosuchcommand'");
  });
});
