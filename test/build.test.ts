// The shipped binary: portable code outside the ISA-specific kernels, every op registered, CLI works.
import { execFileSync, spawnSync } from 'node:child_process';
import { describe, expect, it } from 'vitest';
import { native, nativePath } from '../lib/native.js';
import { info, setSimdLevel, setThreads, simdLevels, ArgumentError, UnsupportedSimdError } from '../lib/index.js';

function hasObjdump(): boolean {
  return spawnSync('objdump', ['--version']).status === 0;
}

describe('build', () => {
  it.skipIf(!hasObjdump())('uses AVX/AVX-512 registers only inside the avx2/avx512 kernel copies', () => {
    const asm = execFileSync('objdump', ['-d', '--no-show-raw-insn', '-C', nativePath()], { maxBuffer: 1 << 30 }).toString();
    const offenders = new Set<string>();
    let fn = '';
    let sawYmm = false;
    let sawZmm = false;
    for (const line of asm.split('\n')) {
      const m = /^[0-9a-f]+ <(.*)>:$/.exec(line);
      if (m) {
        fn = m[1];
        continue;
      }
      sawYmm = line.includes('%ymm');
      sawZmm = line.includes('%zmm');
      if (sawZmm && !fn.includes('avx512')) offenders.add(`zmm in ${fn}`);
      if (sawYmm && !fn.includes('avx2') && !fn.includes('avx512')) offenders.add(`ymm in ${fn}`);
    }
    expect([...offenders].slice(0, 20)).toEqual([]);
    expect(asm).toContain('bts::cpu::avx2::');
    expect(asm).toContain('bts::cpu::avx512::');
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
