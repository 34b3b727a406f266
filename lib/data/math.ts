/**
 * Grade-school maths problems with worked solutions and exact answers, generated from templates
 * (GSM8K style), for the math expert's training text and for the exact-match evaluation of issue 5.
 *
 * Why generated: neither npm nor Debian main carries GSM8K, MATH or any word-problem set
 * (../shared/DATA.md section 4), so the training text and the benchmark are both made here, with exact
 * answers. Every number is an exact rational (bigint numerator/denominator, never a float), so an
 * answer like 7/3 is written and scored exactly.
 *
 * Format of one problem (the same layout as GSM8K's `answer` field):
 * ```
 * question: Mia buys 4 notebooks at $3 each and 2 pens at $2 each. She pays with a $20 bill. ...
 * solution: The notebooks cost 4*3 = <<4*3=12>>12 dollars.
 *           The pens cost 2*2 = <<2*2=4>>4 dollars.
 *           ...
 *           #### 4
 * ```
 * Each step line carries `<<expr=value>>value`, where expr uses + - * / and parentheses over decimal
 * numbers, and value is the canonical form of its exact result ({@link canonicalNumber}). Problems have
 * 2 to 5 steps.
 *
 * Splits and what the test split holds out (the point of the benchmark is generalisation):
 * - train and validation use the {@link MATH_TRAIN_FAMILIES} (15 families: word problems on
 *   shopping, speed, wages, discounts, ages, ratios, units, fractions of a set, averages, recipes,
 *   inventory, savings, and three drills: long multiplication, order of operations, fraction sums)
 *   with numbers drawn from the TRAIN ranges ({@link MATH_RANGES}). A problem belongs to validation
 *   when the FNV-1a hash of its question text is 0 mod 10, else to train, so the two never share a
 *   question whatever the seeds.
 * - test uses the {@link MATH_TEST_FAMILIES} (5 families no training problem uses: fencing cost,
 *   simple interest, trains meeting, profit after breakage, and a bracketed mixed drill) with numbers
 *   from the TEST ranges, which do not overlap the training ranges for the drawn quantities (counts,
 *   prices, percentages, times, multi-digit operands). Intermediate results can of course fall in
 *   any range.
 *
 * Determinism: one generator stream per (seed, split), consumed in order, so `count: 10` is the prefix
 * of `count: 1000` for the same seed. The PRNG (mulberry32 over a FNV-1a mix of seed and split) lives
 * in this file on purpose: changing a shared generator must not change the benchmark.
 *
 * Known limits: English only; templates are few and their phrasing varies little, so a model can
 * learn the surface form quickly (which is what a small model can learn at all); answers are always
 * non-negative.
 */
import { ArgumentError } from '../errors.js';

// ---------------------------------------------------------------------------------------------
// Exact rationals

function gcd(a: bigint, b: bigint): bigint {
  if (a < 0n) a = -a;
  if (b < 0n) b = -b;
  while (b !== 0n) [a, b] = [b, a % b];
  return a;
}

/** An exact rational number n/d with d > 0 and gcd(n, d) = 1 (bigint parts). */
export class Fraction {
  /** Numerator (sign lives here). */
  readonly n: bigint;
  /** Denominator, always positive. */
  readonly d: bigint;

  constructor(n: bigint, d: bigint = 1n) {
    if (d === 0n) throw new ArgumentError('Fraction: division by zero');
    if (d < 0n) {
      n = -n;
      d = -d;
    }
    const g = gcd(n, d) || 1n;
    this.n = n / g;
    this.d = d / g;
  }

  /** An integer (or a decimal string like "2.5", exactly) as a fraction. */
  static of(x: number | bigint | string): Fraction {
    if (typeof x === 'bigint') return new Fraction(x);
    if (typeof x === 'number') {
      if (!Number.isSafeInteger(x)) return Fraction.of(String(x));
      return new Fraction(BigInt(x));
    }
    const m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(x);
    if (!m) throw new ArgumentError(`Fraction.of: not a decimal number: '${x}'`);
    const frac = m[3] ?? '';
    const n = BigInt(m[2] + frac) * (m[1] ? -1n : 1n);
    return new Fraction(n, 10n ** BigInt(frac.length));
  }

  add(o: Fraction): Fraction {
    return new Fraction(this.n * o.d + o.n * this.d, this.d * o.d);
  }
  sub(o: Fraction): Fraction {
    return new Fraction(this.n * o.d - o.n * this.d, this.d * o.d);
  }
  mul(o: Fraction): Fraction {
    return new Fraction(this.n * o.n, this.d * o.d);
  }
  div(o: Fraction): Fraction {
    if (o.n === 0n) throw new ArgumentError('Fraction.div: division by zero');
    return new Fraction(this.n * o.d, this.d * o.n);
  }
  /** -1, 0 or 1. */
  cmp(o: Fraction): number {
    const x = this.n * o.d - o.n * this.d;
    return x < 0n ? -1 : x > 0n ? 1 : 0;
  }
  equals(o: Fraction): boolean {
    return this.n === o.n && this.d === o.d;
  }
  isInteger(): boolean {
    return this.d === 1n;
  }
  /** Canonical text: see {@link canonicalNumber}. */
  toString(): string {
    return canonicalNumber(this);
  }
}

/**
 * The canonical text of an exact number, as used in `<<expr=value>>` annotations and answers:
 * an integer when the denominator is 1 ("12", "-3"); a terminating decimal when the denominator has
 * no prime factors other than 2 and 5 ("2.5", "0.125"); otherwise the reduced fraction ("7/3").
 */
export function canonicalNumber(x: Fraction): string {
  if (x.d === 1n) return x.n.toString();
  let d = x.d;
  let twos = 0;
  let fives = 0;
  while (d % 2n === 0n) {
    d /= 2n;
    twos++;
  }
  while (d % 5n === 0n) {
    d /= 5n;
    fives++;
  }
  if (d !== 1n) return `${x.n}/${x.d}`;
  const k = Math.max(twos, fives);
  const scaled = (x.n * 10n ** BigInt(k)) / x.d; // exact
  const neg = scaled < 0n;
  const digits = (neg ? -scaled : scaled).toString().padStart(k + 1, '0');
  const s = `${digits.slice(0, digits.length - k)}.${digits.slice(digits.length - k)}`;
  return (neg ? '-' : '') + s;
}

/**
 * Evaluates an arithmetic expression exactly: decimal numbers, + - * /, unary minus, parentheses.
 * This is the generator's own evaluator (the tests check its output with an independent one).
 * @throws ArgumentError on a syntax error or a division by zero.
 */
export function evaluateExpression(expr: string): Fraction {
  let i = 0;
  const s = expr.replace(/\s+/g, '');
  const fail = (what: string): never => {
    throw new ArgumentError(`evaluateExpression: ${what} at offset ${i} in '${expr}'`);
  };
  const atom = (): Fraction => {
    if (s[i] === '(') {
      i++;
      const v = sum();
      if (s[i] !== ')') fail("expected ')'");
      i++;
      return v;
    }
    if (s[i] === '-') {
      i++;
      return atom().mul(new Fraction(-1n));
    }
    const m = /^\d+(?:\.\d+)?/.exec(s.slice(i));
    if (!m) return fail('expected a number');
    i += m[0].length;
    return Fraction.of(m[0]);
  };
  const product = (): Fraction => {
    let v = atom();
    while (s[i] === '*' || s[i] === '/') {
      const op = s[i++];
      const r = atom();
      v = op === '*' ? v.mul(r) : v.div(r);
    }
    return v;
  };
  const sum = (): Fraction => {
    let v = product();
    while (s[i] === '+' || s[i] === '-') {
      const op = s[i++];
      const r = product();
      v = op === '+' ? v.add(r) : v.sub(r);
    }
    return v;
  };
  const v = sum();
  if (i !== s.length) fail('unexpected character');
  return v;
}

// ---------------------------------------------------------------------------------------------
// Answers: parsing, extraction, scoring

/**
 * Parses an answer as a person would write it: optional sign, currency sign ($ € £), thousands
 * commas ("1,200"), decimals ("12.0"), a fraction ("3/4"), a mixed number ("1 1/2"), a trailing
 * percent sign or full stop. Returns null when the text is not one number.
 */
export function parseAnswerNumber(text: string): Fraction | null {
  let s = text.trim().replace(/[.。]+$/, '').trim();
  s = s.replace(/%$/, '').trim();
  let sign = 1n;
  if (s.startsWith('-') || s.startsWith('\u2212')) {
    sign = -1n;
    s = s.slice(1).trim();
  }
  s = s.replace(/^[$€£]\s*/, '');
  if (s.startsWith('-') && sign === 1n) {
    sign = -1n;
    s = s.slice(1).trim();
  }
  const num = (t: string): Fraction | null => {
    if (/^\d{1,3}(,\d{3})+(\.\d+)?$/.test(t)) t = t.replace(/,/g, '');
    if (/^\d+(\.\d+)?$/.test(t)) return Fraction.of(t);
    if (/^\.\d+$/.test(t)) return Fraction.of('0' + t);
    return null;
  };
  let v: Fraction | null = null;
  const mixed = /^(\d+)\s+(\d+)\s*\/\s*(\d+)$/.exec(s);
  const frac = /^([\d.,]+)\s*\/\s*([\d.,]+)$/.exec(s);
  if (mixed) {
    if (BigInt(mixed[3]) === 0n) return null;
    v = Fraction.of(mixed[1]).add(new Fraction(BigInt(mixed[2]), BigInt(mixed[3])));
  } else if (frac) {
    const a = num(frac[1]);
    const b = num(frac[2]);
    if (!a || !b || b.n === 0n) return null;
    v = a.div(b);
  } else {
    v = num(s);
  }
  return v ? v.mul(new Fraction(sign)) : null;
}

/**
 * The canonical form of an answer string ("1,200.0" -> "1200", "0.75" and "3/4" -> "0.75",
 * "$4.50" -> "4.5"), or null when it is not a number.
 */
export function canonicalAnswer(text: string): string | null {
  const v = parseAnswerNumber(text);
  return v ? canonicalNumber(v) : null;
}

/**
 * The final answer of a generated solution: the first number after the first `####` marker (the
 * text a model generates after it, e.g. a next problem, is ignored), in canonical form. Returns null
 * when there is no `####` or no number follows it on that line.
 */
export function extractAnswer(generatedText: string): string | null {
  const at = generatedText.indexOf('####');
  if (at < 0) return null;
  const line = generatedText.slice(at + 4).split('\n')[0];
  const m = /[-\u2212]?\s*[$€£]?\s*-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:\s+\d+\s*\/\s*\d+|\s*\/\s*\d[\d,]*(?:\.\d+)?)?/.exec(line);
  if (!m) return null;
  return canonicalAnswer(m[0]);
}

/**
 * True when `predicted` and `expected` are the same number exactly (after parsing both with
 * {@link parseAnswerNumber}: "12" = "12.0" = "$12", "1,200" = "1200", "3/4" = "0.75"). A null or
 * unparseable prediction scores false.
 */
export function scoreExactMatch(predicted: string | null | undefined, expected: string): boolean {
  if (predicted === null || predicted === undefined) return false;
  const e = parseAnswerNumber(expected);
  if (!e) throw new ArgumentError(`scoreExactMatch: expected answer '${expected}' is not a number`);
  const p = parseAnswerNumber(predicted);
  return p !== null && p.equals(e);
}

// ---------------------------------------------------------------------------------------------
// Seeded randomness (kept local: the benchmark must not move when a shared generator changes)

function fnv1a(s: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < s.length; i++) {
    h ^= s.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

class Prng {
  private a: number;
  constructor(seed: number, stream: string) {
    this.a = fnv1a(`${seed}:${stream}`);
  }
  /** Uniform in [0, 1) (mulberry32). */
  next(): number {
    this.a = (this.a + 0x6d2b79f5) >>> 0;
    let t = this.a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  /** Integer in [lo, hi]. */
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(a: readonly T[]): T {
    return a[Math.floor(this.next() * a.length)];
  }
  /** Integer in [lo, hi] that is a multiple of `step` (lo, hi rounded inwards). */
  step(lo: number, hi: number, step: number): number {
    return step * this.int(Math.ceil(lo / step), Math.floor(hi / step));
  }
}

// ---------------------------------------------------------------------------------------------
// Number ranges

/** Inclusive ranges [lo, hi] for the quantities a template draws. */
export interface MathRange {
  /** counts of things (items, marbles, boxes). */
  qty: [number, number];
  /** whole-dollar prices and wages. */
  price: [number, number];
  /** percentages (drawn in steps of 5). */
  pct: [number, number];
  /** durations (hours, weeks, years). */
  time: [number, number];
  /** multi-digit operands of the drills. */
  big: [number, number];
  /** speeds (km/h). */
  speed: [number, number];
}

/**
 * The number ranges: training and validation draw from `train`, the test split from `test`. The
 * drawn quantities never overlap between the two (results and derived numbers may).
 */
export const MATH_RANGES: { readonly train: MathRange; readonly test: MathRange } = Object.freeze({
  train: { qty: [2, 40], price: [1, 20], pct: [5, 50], time: [2, 9], big: [12, 99], speed: [20, 60] },
  test: { qty: [41, 150], price: [21, 90], pct: [55, 95], time: [10, 24], big: [100, 999], speed: [61, 140] },
});

// ---------------------------------------------------------------------------------------------
// Worked-solution builder

interface Person {
  name: string;
  he: string; // subject pronoun, capitalised form derived
  his: string;
  him: string;
}

const PEOPLE: Person[] = [
  ...['Mia', 'Sofia', 'Amara', 'Lena', 'Priya', 'Chloe', 'Yuki', 'Fatima', 'Grace', 'Elena', 'Noor', 'Hannah'].map((name) => ({ name, he: 'she', his: 'her', him: 'her' })),
  ...['Liam', 'Omar', 'Mateo', 'Kenji', 'Lucas', 'Arjun', 'Theo', 'Samuel', 'Diego', 'Felix', 'Kwame', 'Jonah'].map((name) => ({ name, he: 'he', his: 'his', him: 'him' })),
];

const cap = (s: string): string => s.charAt(0).toUpperCase() + s.slice(1);

function twoPeople(r: Prng): [Person, Person] {
  const a = r.pick(PEOPLE);
  let b = r.pick(PEOPLE);
  while (b.name === a.name) b = r.pick(PEOPLE);
  return [a, b];
}

/** Money as written in a question: "$12" or "$12.50". */
function money(x: Fraction | number): string {
  const f = typeof x === 'number' ? Fraction.of(x) : x;
  if (f.isInteger()) return `$${f.n}`;
  const c = canonicalNumber(f);
  const m = /^(-?\d+)\.(\d)$/.exec(c);
  return m ? `$${m[1]}.${m[2]}0` : `$${c}`;
}

class Work {
  readonly lines: string[] = [];
  /**
   * Computes `expr` exactly. `t` is the annotated text "expr = <<expr=value>>value"; `s` is the value
   * as an operand for a later expression (a fraction or a negative value in parentheses, so "10/(5/3)"
   * never reads as "10/5/3").
   */
  calc(expr: string): { v: Fraction; s: string; t: string } {
    const v = evaluateExpression(expr);
    const c = canonicalNumber(v);
    const s = c.includes('/') || c.startsWith('-') ? `(${c})` : c;
    return { v, s, t: `${expr} = <<${expr}=${c}>>${c}` };
  }
  line(text: string): void {
    this.lines.push(text);
  }
}

interface Built {
  question: string;
  work: Work;
  answer: Fraction;
}

/** A template family: draws numbers from a range and writes one problem, or null to redraw. */
interface Family {
  name: string;
  make(r: Prng, g: MathRange): Built | null;
}

const ITEMS: [string, string][] = [
  ['notebook', 'notebooks'],
  ['pen', 'pens'],
  ['apple', 'apples'],
  ['sandwich', 'sandwiches'],
  ['ticket', 'tickets'],
  ['plant', 'plants'],
  ['book', 'books'],
  ['candle', 'candles'],
  ['mug', 'mugs'],
  ['ball', 'balls'],
];

const between = (r: Prng, [lo, hi]: [number, number]): number => r.int(lo, hi);

const TRAIN: Family[] = [
  {
    name: 'shopping-change',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const [i1, i2] = [r.pick(ITEMS), r.pick(ITEMS)];
      if (i1[0] === i2[0]) return null;
      const a = between(r, g.qty), b = between(r, g.qty), x = between(r, g.price), y = between(r, g.price);
      const w = new Work();
      const c1 = w.calc(`${a}*${x}`);
      w.line(`The ${i1[1]} cost ${c1.t} dollars.`);
      const c2 = w.calc(`${b}*${y}`);
      w.line(`The ${i2[1]} cost ${c2.t} dollars.`);
      const tot = w.calc(`${c1.s}+${c2.s}`);
      w.line(`Altogether ${p.he} spends ${tot.t} dollars.`);
      const bill = [20, 50, 100, 200, 500, 1000, 2000, 5000].find((v) => v > Number(tot.v.n));
      if (!bill) return null;
      const ch = w.calc(`${bill}-${tot.s}`);
      w.line(`${cap(p.his)} change is ${ch.t} dollars.`);
      return {
        question: `${p.name} buys ${a} ${i1[1]} at ${money(x)} each and ${b} ${i2[1]} at ${money(y)} each. ${cap(p.he)} pays with a ${money(bill)} bill. How much change does ${p.he} get, in dollars?`,
        work: w,
        answer: ch.v,
      };
    },
  },
  {
    name: 'speed-distance',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const s1 = between(r, g.speed), s2 = between(r, g.speed), t1 = between(r, g.time), t2 = between(r, g.time);
      const w = new Work();
      const d1 = w.calc(`${s1}*${t1}`);
      w.line(`In the first part ${p.he} drives ${d1.t} km.`);
      const d2 = w.calc(`${s2}*${t2}`);
      w.line(`In the second part ${p.he} drives ${d2.t} km.`);
      const d = w.calc(`${d1.s}+${d2.s}`);
      w.line(`In total ${p.he} drives ${d.t} km.`);
      return {
        question: `${p.name} drives at ${s1} km per hour for ${t1} hours, then at ${s2} km per hour for ${t2} hours. How many kilometres does ${p.he} drive in total?`,
        work: w,
        answer: d.v,
      };
    },
  },
  {
    name: 'wages-bonus',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const rate = between(r, g.price), h = between(r, g.time), days = r.int(2, 6), bonus = 5 * between(r, g.qty);
      const w = new Work();
      const hours = w.calc(`${h}*${days}`);
      w.line(`${cap(p.he)} works ${hours.t} hours.`);
      const pay = w.calc(`${hours.s}*${rate}`);
      w.line(`For those hours ${p.he} earns ${pay.t} dollars.`);
      const tot = w.calc(`${pay.s}+${bonus}`);
      w.line(`With the bonus ${p.he} earns ${tot.t} dollars.`);
      return {
        question: `${p.name} earns ${money(rate)} an hour. ${cap(p.he)} works ${h} hours a day for ${days} days and also gets a bonus of ${money(bonus)}. How many dollars does ${p.he} earn?`,
        work: w,
        answer: tot.v,
      };
    },
  },
  {
    name: 'discount',
    make(r, g) {
      const item = r.pick(ITEMS);
      const price = 4 * between(r, g.price), pct = r.step(g.pct[0], g.pct[1], 5), n = r.int(2, 6);
      const w = new Work();
      const off = w.calc(`${price}*${pct}/100`);
      w.line(`The discount on one ${item[0]} is ${off.t} dollars.`);
      const now = w.calc(`${price}-${off.s}`);
      w.line(`One ${item[0]} now costs ${now.t} dollars.`);
      const tot = w.calc(`${n}*${now.s}`);
      w.line(`${n} ${item[1]} cost ${tot.t} dollars.`);
      return {
        question: `A ${item[0]} costs ${money(price)}. The shop takes ${pct}% off the price. How many dollars do ${n} ${item[1]} cost after the discount?`,
        work: w,
        answer: tot.v,
      };
    },
  },
  {
    name: 'ages',
    make(r, g) {
      const [a, b] = twoPeople(r);
      const bAge = between(r, g.qty), k = r.int(2, 30), m = between(r, g.time);
      const w = new Work();
      const aAge = w.calc(`${bAge}+${k}`);
      w.line(`${a.name} is ${aAge.t} years old now.`);
      const aLater = w.calc(`${aAge.s}+${m}`);
      w.line(`In ${m} years ${a.name} will be ${aLater.t}.`);
      const bLater = w.calc(`${bAge}+${m}`);
      w.line(`In ${m} years ${b.name} will be ${bLater.t}.`);
      const sum = w.calc(`${aLater.s}+${bLater.s}`);
      w.line(`The sum of their ages will be ${sum.t}.`);
      return {
        question: `${a.name} is ${k} years older than ${b.name}. ${b.name} is ${bAge} years old. What will the sum of their ages be in ${m} years?`,
        work: w,
        answer: sum.v,
      };
    },
  },
  {
    name: 'ratio-share',
    make(r, g) {
      const [a, b] = twoPeople(r);
      const x = r.int(1, 9), y = r.int(1, 9), unit = between(r, g.qty);
      if (x === y) return null;
      const total = (x + y) * unit;
      const w = new Work();
      const parts = w.calc(`${x}+${y}`);
      w.line(`There are ${parts.t} parts in all.`);
      const one = w.calc(`${total}/${parts.s}`);
      w.line(`One part is ${one.t} stickers.`);
      const bs = w.calc(`${y}*${one.s}`);
      w.line(`${b.name} gets ${bs.t} stickers.`);
      return {
        question: `${a.name} and ${b.name} share ${total} stickers in the ratio ${x}:${y}. How many stickers does ${b.name} get?`,
        work: w,
        answer: bs.v,
      };
    },
  },
  {
    name: 'unit-conversion',
    make(r, g) {
      const feet = between(r, g.qty), inches = r.int(1, 11), k = r.int(2, 8);
      const w = new Work();
      const fi = w.calc(`${feet}*12`);
      w.line(`${feet} feet is ${fi.t} inches.`);
      const len = w.calc(`${fi.s}+${inches}`);
      w.line(`The ribbon is ${len.t} inches long.`);
      const piece = w.calc(`${len.s}/${k}`);
      w.line(`Each piece is ${piece.t} inches long.`);
      return {
        question: `A ribbon is ${feet} feet ${inches} inches long. It is cut into ${k} equal pieces. How many inches long is each piece? (1 foot is 12 inches.)`,
        work: w,
        answer: piece.v,
      };
    },
  },
  {
    name: 'fraction-of-set',
    make(r, g) {
      const [p, q] = twoPeople(r);
      const a = r.int(2, 5), b = r.int(2, 5), unit = between(r, g.qty);
      const n = a * b * unit;
      const w = new Work();
      const give1 = w.calc(`${n}/${a}`);
      w.line(`${cap(p.he)} gives ${q.name} ${give1.t} marbles.`);
      const rest = w.calc(`${n}-${give1.s}`);
      w.line(`${cap(p.he)} has ${rest.t} marbles left.`);
      const give2 = w.calc(`${rest.s}/${b}`);
      w.line(`Then ${p.he} gives away ${give2.t} marbles.`);
      const left = w.calc(`${rest.s}-${give2.s}`);
      w.line(`${p.name} has ${left.t} marbles left.`);
      return {
        question: `${p.name} has ${n} marbles. ${cap(p.he)} gives 1/${a} of them to ${q.name} and then gives away 1/${b} of the marbles that are left. How many marbles does ${p.name} have now?`,
        work: w,
        answer: left.v,
      };
    },
  },
  {
    name: 'average-needed',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const hi = 40 + g.qty[1];
      const s = [r.int(40, hi), r.int(40, hi), r.int(40, hi)];
      const target = r.int(40, hi);
      const w = new Work();
      const need = w.calc(`${target}*4`);
      w.line(`For an average of ${target} over four tests ${p.he} needs ${need.t} points.`);
      const have = w.calc(`${s[0]}+${s[1]}+${s[2]}`);
      w.line(`${cap(p.he)} already has ${have.t} points.`);
      const last = w.calc(`${need.s}-${have.s}`);
      if (last.v.cmp(Fraction.of(0)) < 0 || last.v.cmp(Fraction.of(hi)) > 0) return null;
      w.line(`${cap(p.he)} must score ${last.t} on the fourth test.`);
      return {
        question: `${p.name} scored ${s[0]}, ${s[1]} and ${s[2]} points on three tests. How many points must ${p.he} score on the fourth test to have an average of ${target}?`,
        work: w,
        answer: last.v,
      };
    },
  },
  {
    name: 'recipe-scaling',
    make(r, g) {
      const cups = r.int(1, 6), batch = between(r, g.qty), want = between(r, g.qty);
      if (batch === want) return null;
      const w = new Work();
      const per = w.calc(`${cups}/${batch}`);
      w.line(`One cookie needs ${per.t} cups of flour.`);
      const need = w.calc(`${want}*${per.s}`);
      w.line(`${want} cookies need ${need.t} cups of flour.`);
      return {
        question: `A recipe uses ${cups} cups of flour to make ${batch} cookies. How many cups of flour are needed for ${want} cookies?`,
        work: w,
        answer: need.v,
      };
    },
  },
  {
    name: 'inventory',
    make(r, g) {
      const boxes = between(r, g.qty), per = between(r, g.qty);
      const total = boxes * per;
      const mon = r.int(1, Math.max(1, Math.floor(total / 3))), tue = r.int(1, Math.max(1, Math.floor(total / 3)));
      const w = new Work();
      const all = w.calc(`${boxes}*${per}`);
      w.line(`The shop has ${all.t} pencils.`);
      const sold = w.calc(`${mon}+${tue}`);
      w.line(`It sells ${sold.t} pencils.`);
      const left = w.calc(`${all.s}-${sold.s}`);
      w.line(`It has ${left.t} pencils left.`);
      return {
        question: `A shop has ${boxes} boxes of pencils with ${per} pencils in each box. It sells ${mon} pencils on Monday and ${tue} pencils on Tuesday. How many pencils are left?`,
        work: w,
        answer: left.v,
      };
    },
  },
  {
    name: 'savings',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const weekly = between(r, g.price), weeks = between(r, g.time), gift = 5 * between(r, g.qty);
      const saved = weekly * weeks + gift;
      const cost = r.int(1, saved - 1);
      const item = r.pick(ITEMS);
      const w = new Work();
      const s1 = w.calc(`${weekly}*${weeks}`);
      w.line(`${cap(p.he)} saves ${s1.t} dollars.`);
      const s2 = w.calc(`${s1.s}+${gift}`);
      w.line(`With the gift ${p.he} has ${s2.t} dollars.`);
      const left = w.calc(`${s2.s}-${cost}`);
      w.line(`After buying the ${item[0]} ${p.he} has ${left.t} dollars left.`);
      return {
        question: `${p.name} saves ${money(weekly)} every week for ${weeks} weeks and gets ${money(gift)} as a gift. Then ${p.he} buys a ${item[0]} for ${money(cost)}. How many dollars does ${p.he} have left?`,
        work: w,
        answer: left.v,
      };
    },
  },
  {
    name: 'drill-long-multiplication',
    make(r, g) {
      const a = between(r, g.big), b = between(r, [Math.max(12, g.big[0]), Math.min(99, g.big[1])]);
      const tens = Math.floor(b / 10) * 10, ones = b % 10;
      if (ones === 0) return null;
      const w = new Work();
      const p1 = w.calc(`${a}*${tens}`);
      w.line(`${a} times ${tens} is ${p1.t}.`);
      const p2 = w.calc(`${a}*${ones}`);
      w.line(`${a} times ${ones} is ${p2.t}.`);
      const s = w.calc(`${p1.s}+${p2.s}`);
      w.line(`Adding the parts gives ${s.t}.`);
      return { question: `Compute ${a} × ${b}.`, work: w, answer: s.v };
    },
  },
  {
    name: 'drill-order-of-operations',
    make(r, g) {
      const a = between(r, g.big), b = between(r, g.qty), c = between(r, g.qty), d = between(r, g.qty);
      const w = new Work();
      const m = w.calc(`${b}*${c}`);
      w.line(`Multiply first: ${m.t}.`);
      const s = w.calc(`${a}+${m.s}`);
      w.line(`Then add: ${s.t}.`);
      const t = w.calc(`${s.s}-${d}`);
      w.line(`Then subtract: ${t.t}.`);
      return { question: `Evaluate ${a} + ${b} × ${c} − ${d}.`, work: w, answer: t.v };
    },
  },
  {
    name: 'drill-fraction-sum',
    make(r) {
      const b = r.int(2, 12), d = r.int(2, 12);
      const a = r.int(1, b - 1), c = r.int(1, d - 1);
      const w = new Work();
      const num = w.calc(`${a}*${d}+${c}*${b}`);
      w.line(`Over the common denominator the numerator is ${num.t}.`);
      const den = w.calc(`${b}*${d}`);
      w.line(`The denominator is ${den.t}.`);
      const v = w.calc(`${num.s}/${den.s}`);
      w.line(`So the sum is ${v.t}.`);
      return { question: `What is ${a}/${b} + ${c}/${d}? Give the answer as a fraction or a decimal.`, work: w, answer: v.v };
    },
  },
];

const TEST: Family[] = [
  {
    name: 'fencing-cost',
    make(r, g) {
      const l = between(r, g.qty), wd = between(r, g.qty), c = between(r, g.price);
      const w = new Work();
      const half = w.calc(`${l}+${wd}`);
      w.line(`One length and one width make ${half.t} metres.`);
      const per = w.calc(`2*${half.s}`);
      w.line(`The perimeter is ${per.t} metres.`);
      const cost = w.calc(`${per.s}*${c}`);
      w.line(`The fencing costs ${cost.t} dollars.`);
      return {
        question: `A rectangular garden is ${l} metres long and ${wd} metres wide. Fencing costs ${money(c)} per metre. How many dollars does it cost to put a fence all around the garden?`,
        work: w,
        answer: cost.v,
      };
    },
  },
  {
    name: 'simple-interest',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const principal = 100 * between(r, g.qty), rate = r.step(g.pct[0], g.pct[1], 5) / 10, years = between(r, g.time);
      const w = new Work();
      const yearly = w.calc(`${principal}*${rate}/100`);
      w.line(`Each year the interest is ${yearly.t} dollars.`);
      const all = w.calc(`${yearly.s}*${years}`);
      w.line(`In ${years} years the interest is ${all.t} dollars.`);
      const tot = w.calc(`${principal}+${all.s}`);
      w.line(`The account holds ${tot.t} dollars.`);
      return {
        question: `${p.name} puts ${money(principal)} in an account that pays ${rate}% simple interest per year. How many dollars are in the account after ${years} years?`,
        work: w,
        answer: tot.v,
      };
    },
  },
  {
    name: 'trains-meeting',
    make(r, g) {
      const v1 = between(r, g.speed), v2 = between(r, g.speed);
      const hours = between(r, [Math.max(2, Math.floor(g.time[0] / 2)), Math.max(3, Math.floor(g.time[1] / 2))]) + (r.next() < 0.5 ? 0.5 : 0);
      const dist = (v1 + v2) * hours;
      const w = new Work();
      const closing = w.calc(`${v1}+${v2}`);
      w.line(`The gap closes by ${closing.t} km every hour.`);
      const t = w.calc(`${dist}/${closing.s}`);
      w.line(`They meet after ${t.t} hours.`);
      const d1 = w.calc(`${v1}*${t.s}`);
      w.line(`The first train travels ${d1.t} km.`);
      return {
        question: `Two trains start ${dist} km apart and travel toward each other, one at ${v1} km per hour and the other at ${v2} km per hour. How many kilometres has the first train travelled when they meet?`,
        work: w,
        answer: d1.v,
      };
    },
  },
  {
    name: 'profit-breakage',
    make(r, g) {
      const p = r.pick(PEOPLE);
      const item = r.pick(ITEMS);
      const n = between(r, g.qty), c = between(r, g.price), broken = r.int(1, Math.max(1, Math.floor(n / 5)));
      const sell = c + r.int(Math.ceil(c / 2), 2 * c);
      const w = new Work();
      const cost = w.calc(`${n}*${c}`);
      w.line(`${cap(p.he)} spends ${cost.t} dollars.`);
      const left = w.calc(`${n}-${broken}`);
      w.line(`${cap(p.he)} has ${left.t} ${item[1]} to sell.`);
      const income = w.calc(`${left.s}*${sell}`);
      w.line(`Selling them brings ${income.t} dollars.`);
      const profit = w.calc(`${income.s}-${cost.s}`);
      if (profit.v.cmp(Fraction.of(0)) <= 0) return null;
      w.line(`The profit is ${profit.t} dollars.`);
      return {
        question: `${p.name} buys ${n} ${item[1]} for ${money(c)} each. ${broken} of them break. ${cap(p.he)} sells the rest for ${money(sell)} each. How many dollars of profit does ${p.he} make?`,
        work: w,
        answer: profit.v,
      };
    },
  },
  {
    name: 'drill-bracketed',
    make(r, g) {
      const b = between(r, g.qty), a = b + between(r, g.big), c = between(r, g.qty), d = between(r, g.qty), e = r.int(2, 9);
      const w = new Work();
      const x = w.calc(`${a}-${b}`);
      w.line(`First bracket: ${x.t}.`);
      const y = w.calc(`${c}+${d}`);
      w.line(`Second bracket: ${y.t}.`);
      const z = w.calc(`${x.s}*${y.s}`);
      w.line(`Multiply: ${z.t}.`);
      const v = w.calc(`${z.s}/${e}`);
      w.line(`Divide: ${v.t}.`);
      return { question: `Evaluate (${a} − ${b}) × (${c} + ${d}) ÷ ${e}.`, work: w, answer: v.v };
    },
  },
];

/** Names of the template families used by the train and validation splits (15). */
export const MATH_TRAIN_FAMILIES: readonly string[] = Object.freeze(TRAIN.map((f) => f.name));
/** Names of the held-out template families used only by the test split (5). */
export const MATH_TEST_FAMILIES: readonly string[] = Object.freeze(TEST.map((f) => f.name));

// ---------------------------------------------------------------------------------------------
// Public generator

/** One generated problem. */
export interface MathProblem {
  /** The question text (one paragraph). */
  question: string;
  /** Worked solution: step lines with `<<expr=value>>value`, then a final line `#### answer`. */
  solution: string;
  /** The exact final answer in canonical form ({@link canonicalNumber}): "12", "2.5", "7/3". */
  answer: string;
  /** The template family name (one of {@link MATH_TRAIN_FAMILIES} or {@link MATH_TEST_FAMILIES}). */
  family: string;
}

/** Which split to generate: train and validation share families and ranges, test holds both out. */
export type MathSplit = 'train' | 'validation' | 'test';

/** Options of {@link generateMath}. */
export interface GenerateMathOptions {
  /** Split to draw from. */
  split: MathSplit;
  /** Number of problems (a non-negative integer). */
  count: number;
  /** Seed (any safe integer); the same seed, split and count give the same problems. Default 0. */
  seed?: number;
}

/** True when `question` belongs to the validation side of the training families (1 in 10 by hash). */
function isValidationQuestion(question: string): boolean {
  return fnv1a(question) % 10 === 0;
}

/**
 * Generates `count` distinct problems of a split, deterministically for the seed. See the file
 * header for what each split holds.
 * @throws ArgumentError on a bad split, count or seed, or when the split's families cannot supply
 * that many distinct problems.
 */
export function generateMath(options: GenerateMathOptions): MathProblem[] {
  const { split, count } = options;
  const seed = options.seed ?? 0;
  if (split !== 'train' && split !== 'validation' && split !== 'test') {
    throw new ArgumentError(`generateMath: split must be 'train', 'validation' or 'test', got '${String(split)}'`);
  }
  if (!Number.isSafeInteger(count) || count < 0) throw new ArgumentError(`generateMath: count must be a non-negative integer, got ${count}`);
  if (!Number.isSafeInteger(seed)) throw new ArgumentError(`generateMath: seed must be a safe integer, got ${seed}`);
  const families = split === 'test' ? TEST : TRAIN;
  const range = split === 'test' ? MATH_RANGES.test : MATH_RANGES.train;
  const r = new Prng(seed, `bts-math:${split}`);
  const out: MathProblem[] = [];
  const seen = new Set<string>();
  const maxTries = 200 * count + 1000;
  for (let tries = 0; out.length < count; tries++) {
    if (tries > maxTries) {
      throw new ArgumentError(`generateMath: could not draw ${count} distinct ${split} problems (got ${out.length}); ask for fewer`);
    }
    const fam = r.pick(families);
    const b = fam.make(r, range);
    if (!b || b.answer.cmp(Fraction.of(0)) < 0) continue;
    if (split !== 'test' && isValidationQuestion(b.question) !== (split === 'validation')) continue;
    if (seen.has(b.question)) continue;
    const nSteps = b.work.lines.length;
    if (nSteps < 2 || nSteps > 5) throw new Error(`math family ${fam.name} wrote ${nSteps} steps (must be 2-5)`);
    seen.add(b.question);
    const answer = canonicalNumber(b.answer);
    out.push({ question: b.question, solution: `${b.work.lines.join('\n')}\n#### ${answer}`, answer, family: fam.name });
  }
  return out;
}

/**
 * The training text of one problem: the question, a newline, the worked solution (ending in the
 * `#### answer` line). A model trained on this and prompted with `question + "\n"` generates a
 * solution whose final answer {@link extractAnswer} reads.
 */
export function formatMathDocument(p: MathProblem): string {
  return `${p.question}\n${p.solution}`;
}
