// Generated grade-school maths (lib/data/math.ts): every worked step and final answer is checked by an
// independent evaluator written here (its own bigint rational arithmetic and expression parser);
// split/family/range rules, determinism, and answer extraction/scoring on tricky strings.
import { describe, expect, it } from 'vitest';
import {
  generateMath,
  extractAnswer,
  scoreExactMatch,
  canonicalAnswer,
  formatMathDocument,
  MATH_TRAIN_FAMILIES,
  MATH_TEST_FAMILIES,
  MATH_RANGES,
  type MathProblem,
} from '../../lib/data/math.js';

// ---- independent exact arithmetic: [num, den] with den > 0, reduced -------------------------
type Q = [bigint, bigint];
const absB = (x: bigint): bigint => (x < 0n ? -x : x);
function gcdB(a: bigint, b: bigint): bigint {
  a = absB(a);
  b = absB(b);
  while (b) [a, b] = [b, a % b];
  return a;
}
function q(n: bigint, d: bigint): Q {
  if (d === 0n) throw new Error('division by zero');
  if (d < 0n) [n, d] = [-n, -d];
  const g = gcdB(n, d) || 1n;
  return [n / g, d / g];
}
const add = (a: Q, b: Q): Q => q(a[0] * b[1] + b[0] * a[1], a[1] * b[1]);
const sub = (a: Q, b: Q): Q => q(a[0] * b[1] - b[0] * a[1], a[1] * b[1]);
const mul = (a: Q, b: Q): Q => q(a[0] * b[0], a[1] * b[1]);
const div = (a: Q, b: Q): Q => q(a[0] * b[1], a[1] * b[0]);
const eq = (a: Q, b: Q): boolean => a[0] === b[0] && a[1] === b[1];

/** Shunting-yard evaluation of + - * / ( ) over decimals, written independently of the library. */
function evalQ(src: string): Q {
  const toks = src.match(/\d+(?:\.\d+)?|[-+*/()]/g);
  if (!toks || toks.join('') !== src.replace(/\s+/g, '')) throw new Error(`bad expression '${src}'`);
  const out: Q[] = [];
  const ops: string[] = [];
  const prec: Record<string, number> = { '+': 1, '-': 1, '*': 2, '/': 2, neg: 3 };
  const apply = (op: string): void => {
    if (op === 'neg') {
      const a = out.pop()!;
      out.push([-a[0], a[1]]);
      return;
    }
    const b = out.pop()!;
    const a = out.pop()!;
    out.push(op === '+' ? add(a, b) : op === '-' ? sub(a, b) : op === '*' ? mul(a, b) : div(a, b));
  };
  let prevOperand = false;
  for (const t of toks) {
    if (/^\d/.test(t)) {
      const [i, f = ''] = t.split('.');
      out.push(q(BigInt(i + f), 10n ** BigInt(f.length)));
      prevOperand = true;
    } else if (t === '(') {
      ops.push(t);
      prevOperand = false;
    } else if (t === ')') {
      while (ops.length && ops[ops.length - 1] !== '(') apply(ops.pop()!);
      ops.pop();
      prevOperand = true;
    } else {
      const op = t === '-' && !prevOperand ? 'neg' : t;
      while (op !== 'neg' && ops.length && ops[ops.length - 1] !== '(' && prec[ops[ops.length - 1]] >= prec[op]) apply(ops.pop()!);
      ops.push(op);
      prevOperand = false;
    }
  }
  while (ops.length) apply(ops.pop()!);
  if (out.length !== 1) throw new Error(`bad expression '${src}'`);
  return out[0];
}

/** Value of an answer / annotation value: an integer, a decimal or a fraction "a/b". */
const valQ = (s: string): Q => evalQ(s);

function checkProblem(p: MathProblem): void {
  const lines = p.solution.split('\n');
  const final = lines.pop()!;
  expect(final).toMatch(/^#### /);
  expect(lines.length).toBeGreaterThanOrEqual(2);
  expect(lines.length).toBeLessThanOrEqual(5);
  let last: Q | null = null;
  for (const line of lines) {
    const anns = [...line.matchAll(/<<([^=<>]+)=([^<>]+)>>(-?[\d./]+?)(?=\.?(?:\s|$)|,)/g)];
    expect(anns.length, line).toBeGreaterThanOrEqual(1);
    for (const [, expr, val, shown] of anns) {
      const v = evalQ(expr);
      expect(eq(v, valQ(val)), `${expr} = ${val} in: ${line}`).toBe(true);
      expect(shown).toBe(val);
      last = v;
    }
  }
  const answer = final.slice(5);
  expect(answer).toBe(p.answer);
  expect(eq(valQ(answer), last!)).toBe(true);
  expect(extractAnswer(p.solution)).toBe(p.answer);
  expect(extractAnswer(formatMathDocument(p) + '\n\nNext question: 7 + 8')).toBe(p.answer);
}

describe('generateMath', () => {
  it('every step and answer checks out under an independent evaluator, every split', () => {
    for (const split of ['train', 'validation', 'test'] as const) {
      for (const seed of [0, 7]) {
        const ps = generateMath({ split, count: 400, seed });
        expect(ps).toHaveLength(400);
        for (const p of ps) checkProblem(p);
      }
    }
  });

  it('has at least 12 training and 4 held-out families, disjoint, and each split uses its own', () => {
    expect(MATH_TRAIN_FAMILIES.length).toBeGreaterThanOrEqual(12);
    expect(MATH_TEST_FAMILIES.length).toBeGreaterThanOrEqual(4);
    expect(MATH_TRAIN_FAMILIES.filter((f) => MATH_TEST_FAMILIES.includes(f))).toEqual([]);
    const train = generateMath({ split: 'train', count: 3000, seed: 3 });
    const val = generateMath({ split: 'validation', count: 500, seed: 3 });
    const test = generateMath({ split: 'test', count: 500, seed: 3 });
    expect(new Set(train.map((p) => p.family))).toEqual(new Set(MATH_TRAIN_FAMILIES));
    for (const p of val) expect(MATH_TRAIN_FAMILIES).toContain(p.family);
    expect(new Set(test.map((p) => p.family))).toEqual(new Set(MATH_TEST_FAMILIES));
    // multi-step: the mean is well above 2 steps
    const steps = train.map((p) => p.solution.split('\n').length - 1);
    expect(steps.reduce((a, b) => a + b, 0) / steps.length).toBeGreaterThan(2.5);
  });

  it('train, validation and test never share a question, whatever the seeds', () => {
    const train = new Set(generateMath({ split: 'train', count: 4000, seed: 1 }).map((p) => p.question));
    const val = generateMath({ split: 'validation', count: 1000, seed: 2 });
    const test = generateMath({ split: 'test', count: 1000, seed: 1 });
    for (const p of val) expect(train.has(p.question)).toBe(false);
    for (const p of test) expect(train.has(p.question)).toBe(false);
    // no duplicates inside a split
    expect(new Set(val.map((p) => p.question)).size).toBe(val.length);
  });

  it('train and test number ranges do not overlap', () => {
    for (const k of Object.keys(MATH_RANGES.train) as (keyof typeof MATH_RANGES.train)[]) {
      const [a0, a1] = MATH_RANGES.train[k];
      const [b0, b1] = MATH_RANGES.test[k];
      expect(a1 < b0 || b1 < a0, k).toBe(true);
    }
    // The held-out drill draws its first subtrahend from the test qty range: check it in the text.
    const drills = generateMath({ split: 'test', count: 300, seed: 5 }).filter((p) => p.family === 'drill-bracketed');
    expect(drills.length).toBeGreaterThan(10);
    for (const p of drills) {
      const b = Number(/\(\d+ − (\d+)\)/.exec(p.question)![1]);
      expect(b).toBeGreaterThanOrEqual(MATH_RANGES.test.qty[0]);
      expect(b).toBeLessThanOrEqual(MATH_RANGES.test.qty[1]);
    }
  });

  it('is deterministic for a seed, prefix-stable in count, and changes with the seed', () => {
    const a = generateMath({ split: 'train', count: 200, seed: 42 });
    const b = generateMath({ split: 'train', count: 200, seed: 42 });
    const c = generateMath({ split: 'train', count: 50, seed: 42 });
    const d = generateMath({ split: 'train', count: 200, seed: 43 });
    expect(b).toEqual(a);
    expect(c).toEqual(a.slice(0, 50));
    expect(d.map((p) => p.question)).not.toEqual(a.map((p) => p.question));
  });

  it('rejects bad options with ArgumentError', () => {
    expect(() => generateMath({ split: 'dev' as never, count: 1 })).toThrow(/split/);
    expect(() => generateMath({ split: 'train', count: -1 })).toThrow(/count/);
    expect(() => generateMath({ split: 'train', count: 1.5 })).toThrow(/count/);
    expect(() => generateMath({ split: 'train', count: 1, seed: 0.5 })).toThrow(/seed/);
  });
});

describe('answers', () => {
  it('extractAnswer reads the first number after ####', () => {
    expect(extractAnswer('so 3*4 = 12\n#### 12')).toBe('12');
    expect(extractAnswer('#### 1,200\n')).toBe('1200');
    expect(extractAnswer('####   $4.50 dollars')).toBe('4.5');
    expect(extractAnswer('#### 12.0')).toBe('12');
    expect(extractAnswer('#### -7')).toBe('-7');
    expect(extractAnswer('#### 3/4')).toBe('0.75');
    expect(extractAnswer('#### 7/3 cups')).toBe('7/3');
    expect(extractAnswer('#### 1 1/2')).toBe('1.5');
    expect(extractAnswer('#### 14\nQ: next\n#### 99')).toBe('14');
    expect(extractAnswer('The answer is 12.')).toBeNull();
    expect(extractAnswer('#### \nlater 5')).toBeNull();
    expect(extractAnswer('#### twelve')).toBeNull();
    expect(extractAnswer('')).toBeNull();
  });

  it('canonicalAnswer and scoreExactMatch compare exact values', () => {
    expect(canonicalAnswer('0012')).toBe('12');
    expect(canonicalAnswer('.5')).toBe('0.5');
    expect(canonicalAnswer('6/8')).toBe('0.75');
    expect(canonicalAnswer('10/3')).toBe('10/3');
    expect(canonicalAnswer('1,2345')).toBeNull(); // not a thousands grouping
    expect(canonicalAnswer('12%')).toBe('12');
    expect(canonicalAnswer('1/0')).toBeNull();
    expect(scoreExactMatch('12.0', '12')).toBe(true);
    expect(scoreExactMatch('1,200', '1200')).toBe(true);
    expect(scoreExactMatch('$1,200.00', '1200')).toBe(true);
    expect(scoreExactMatch('3/4', '0.75')).toBe(true);
    expect(scoreExactMatch('0.333', '1/3')).toBe(false);
    expect(scoreExactMatch('12', '13')).toBe(false);
    expect(scoreExactMatch('-12', '12')).toBe(false);
    expect(scoreExactMatch(null, '12')).toBe(false);
    expect(scoreExactMatch('abc', '12')).toBe(false);
    expect(() => scoreExactMatch('12', 'abc')).toThrow(/expected answer/);
    // round trip with generated answers, including fractions and decimals
    for (const p of generateMath({ split: 'train', count: 300, seed: 9 })) {
      expect(scoreExactMatch(extractAnswer(`#### ${p.answer}`), p.answer)).toBe(true);
    }
  });
});
