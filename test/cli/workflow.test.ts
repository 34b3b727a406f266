/**
 * The `bts` command line end to end on a toy corpus: tokenizer train, pretrain (and resume), generate,
 * eval, branch, train (an expert), merge (soup), stitch (train, remove an expert, add one back),
 * generate/eval on the stitched model, gates; plus the clear errors the issues ask for (missing
 * files, bad configs, out-of-range token ids) and `--help` on every command.
 */
import { spawnSync } from 'node:child_process';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'bts-cli-'));
afterAll(() => fs.rmSync(tmp, { recursive: true, force: true }));

function bts(...args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, ['--import', 'tsx', 'lib/cli.ts', ...args], { encoding: 'utf8', env: { ...process.env, BTS_QUIET: '1' }, timeout: 120_000 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

function ok(...args: string[]): string {
  const r = bts(...args);
  if (r.code !== 0) throw new Error(`bts ${args.join(' ')} exited ${r.code}:\n${r.stderr}\n${r.stdout}`);
  return r.stdout;
}

const english = path.join(tmp, 'english.txt');
const code = path.join(tmp, 'code.txt');
const math = path.join(tmp, 'math.txt');
fs.writeFileSync(english, 'The cat sat on the mat. The dog ran to the park and back again. '.repeat(60));
fs.writeFileSync(code, 'function add(a, b) {\n  return a + b;\n}\nconst x = add(1, 2);\n'.repeat(60));
fs.writeFileSync(math, 'Tom has 3 apples and buys 4 more. 3+4=7. #### 7\n'.repeat(60));
const train = ['--steps', '4', '--batch', '2', '--seq-len', '16', '--eval-every', '2', '--checkpoint-every', '2'];

describe('bts CLI workflow', () => {
  it('every command has --help', () => {
    for (const c of ['demo', 'tokenizer', 'pretrain', 'train', 'branch', 'stitch', 'generate', 'eval', 'gates', 'merge']) {
      const out = ok(c, '--help');
      expect(out).toMatch(/Usage:\s+bts /);
    }
    expect(ok('--help')).toMatch(/pretrain .*\n[\s\S]*stitch/);
  });

  it('trains a tokenizer, pretrains (resumable), generates and evaluates', () => {
    ok('tokenizer', 'train', '--out', path.join(tmp, 'tok'), '--vocab-size', '300', english, code, math);
    expect(fs.existsSync(path.join(tmp, 'tok', 'tokenizer.json'))).toBe(true);
    const seed = path.join(tmp, 'seed');
    ok('pretrain', '--config', 'tiny', '--tokenizer', path.join(tmp, 'tok', 'tokenizer.json'), '--data', english, '--data', code, '--data', math, '--out', seed, ...train);
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'loss.svg', 'train.json']) expect(fs.existsSync(path.join(seed, f))).toBe(true);
    // Rerunning with more steps resumes from the checkpoint instead of starting over.
    const r = bts('pretrain', '--config', 'tiny', '--tokenizer', path.join(tmp, 'tok', 'tokenizer.json'), '--data', english, '--data', code, '--data', math, '--out', seed, ...train.map((x) => (x === '4' ? '6' : x)));
    expect(r.code).toBe(0);
    expect(r.stderr).toMatch(/resuming from step 4/);
    const summary = JSON.parse(fs.readFileSync(path.join(seed, 'train.json'), 'utf8'));
    expect(summary.steps).toBe(6);
    expect(summary.history).toHaveLength(6);
    const gen = ok('generate', '--model', seed, '--prompt', 'The cat', '--max-tokens', '5', '--temperature', '0');
    expect(gen.startsWith('The cat')).toBe(true);
    const ev = JSON.parse(ok('eval', '--model', seed, '--data', english, '--seq-len', '16', '--json'));
    expect(ev.loss).toBeGreaterThan(0);
    expect(ev.perplexity).toBeCloseTo(Math.exp(ev.loss), 6);
  });

  it('branches, trains experts, merges a soup, and stitches them', () => {
    const seed = path.join(tmp, 'seed');
    for (const [name, file] of [['code', code], ['math', math]]) {
      ok('branch', '--seed', seed, '--out', path.join(tmp, `branch-${name}`));
      expect(JSON.parse(fs.readFileSync(path.join(tmp, `branch-${name}`, 'branch.json'), 'utf8')).seedSha256).toMatch(/^[0-9a-f]{64}$/);
      ok('train', '--model', path.join(tmp, `branch-${name}`), '--data', file, '--out', path.join(tmp, `expert-${name}`), ...train);
    }
    ok('merge', '--model', seed, '--model', path.join(tmp, 'expert-code'), '--model', path.join(tmp, 'expert-math'), '--out', path.join(tmp, 'soup'));
    expect(fs.existsSync(path.join(tmp, 'soup', 'model.safetensors'))).toBe(true);
    const st = path.join(tmp, 'stitched');
    ok('stitch', '--hub', seed, '--expert', `code=${path.join(tmp, 'expert-code')}`, '--expert', `math=${path.join(tmp, 'expert-math')}`, '--data', `english=${english}`, '--data', `code=${code}`, '--data', `math=${math}`, '--mix', 'english=0.5,code=0.25,math=0.25', '--k', '2', '--out', st, ...train);
    const man = JSON.parse(fs.readFileSync(path.join(st, 'stitch.json'), 'utf8'));
    expect(man.experts.map((e: { name: string }) => e.name)).toEqual(['code', 'math']);
    expect(ok('generate', '--model', st, '--prompt', 'The', '--max-tokens', '4', '--temperature', '0').startsWith('The')).toBe(true);
    expect(JSON.parse(ok('eval', '--model', st, '--data', code, '--seq-len', '16', '--json')).loss).toBeGreaterThan(0);
    ok('gates', '--model', st, '--text', 'function add(a, b)', '--out', path.join(tmp, 'gates.svg'));
    expect(fs.readFileSync(path.join(tmp, 'gates.svg'), 'utf8')).toMatch(/<svg/);
    // Remove the math expert (no retraining), then add it back training only its slices.
    ok('stitch', '--from', st, '--remove-expert', 'math', '--out', path.join(tmp, 'no-math'));
    expect(JSON.parse(fs.readFileSync(path.join(tmp, 'no-math', 'stitch.json'), 'utf8')).experts).toHaveLength(1);
    expect(ok('generate', '--model', path.join(tmp, 'no-math'), '--prompt', 'The', '--max-tokens', '3').length).toBeGreaterThan(0);
    ok('stitch', '--from', path.join(tmp, 'no-math'), '--add-expert', `math=${path.join(tmp, 'expert-math')}`, '--data', `math=${math}`, '--out', path.join(tmp, 'math-back'), ...train);
    expect(JSON.parse(fs.readFileSync(path.join(tmp, 'math-back', 'stitch.json'), 'utf8')).experts).toHaveLength(2);
  });

  it('gives clear errors for missing files, bad configs and out-of-range token ids', () => {
    let r = bts('pretrain', '--data', path.join(tmp, 'nope.txt'), '--out', path.join(tmp, 'x'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/data file not found: .*nope\.txt/);
    r = bts('generate', '--model', path.join(tmp, 'nowhere'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/model directory not found/);
    const bad = path.join(tmp, 'bad-config.json');
    fs.writeFileSync(bad, JSON.stringify({ model_type: 'llama', hidden_size: 30, num_attention_heads: 4, vocab_size: 300 }));
    r = bts('pretrain', '--config', bad, '--tokenizer', path.join(tmp, 'tok', 'tokenizer.json'), '--data', english, '--out', path.join(tmp, 'y'));
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/hidden_size \(30\) must be divisible by num_attention_heads \(4\)/);
    r = bts('generate', '--model', path.join(tmp, 'seed'), '--ids', '1,2,99999');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/token 2 = 99999 is outside the vocabulary/);
    r = bts('train', '--model', path.join(tmp, 'seed'), '--data', english, '--out', path.join(tmp, 'z'), '--precision', 'fp8');
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/--precision must be f32 or bf16/);
  });
});
