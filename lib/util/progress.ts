/**
 * Progress reporting for long jobs (tokenizing a corpus, training, evaluation) on a terminal or in
 * a log file, plus the duration / rate / count formatters it uses.
 *
 * Why it is shaped this way: on a terminal people want one line redrawn in place (bar, percent,
 * rate, ETA, and fields such as the loss); in CI logs and `nohup` files a redrawn line becomes
 * thousands of lines of `\r` noise. So the mode follows the stream: a TTY gets the line rewritten
 * with `\r` at most every `redrawMs` (default 100 ms, ~10 per second), anything else gets one plain
 * line every `intervalS` seconds (default 10) and a final line. Callers may call `update` as often
 * as they like: between redraws it only records a number.
 *
 * The rate is measured over a sliding window of the last ~30 s (samples at most every 250 ms), so
 * the ETA follows a job whose speed changes (warm-up, evaluation pauses) instead of averaging over
 * the whole run; before two samples exist the rate is unknown ("--").
 *
 * Known limits: one line per Progress; the width of wide characters is not measured when the line
 * is cut to the terminal width; writes are synchronous calls of `stream.write`.
 */
import { ArgumentError } from '../errors.js';

/** Where progress goes: a writable with optional TTY hints (process.stderr fits). */
export interface ProgressStream {
  write(chunk: string): unknown;
  /** True on a terminal: enables in-place redraws. */
  isTTY?: boolean;
  /** Terminal width; the line is cut to it. Default 80. */
  columns?: number;
}

/** Options of {@link Progress}. */
export interface ProgressOptions {
  /** Units of work in all; undefined or 0 when unknown (no bar, percent or ETA). */
  total?: number;
  /** Text at the start of the line, e.g. "train" or "tokenize". */
  label: string;
  /** Unit of the counts and rate, e.g. "tok", "step". Default "it". */
  unit?: string;
  /** Output. Default process.stderr. */
  stream?: ProgressStream;
  /** Force (true) or forbid (false) in-place redraws. Default: stream.isTTY. */
  tty?: boolean;
  /** Non-TTY: seconds between lines. Default 10. */
  intervalS?: number;
  /** TTY: least milliseconds between redraws. Default 100. */
  redrawMs?: number;
  /** Clock in milliseconds (tests inject a fake one). Default performance.now. */
  now?: () => number;
}

const WINDOW_MS = 30_000;
const SAMPLE_MS = 250;

/** Human duration: "42s", "3m05s", "2h07m", "3d04h"; "--" for NaN, Infinity or negative input. */
export function formatDuration(seconds: number): string {
  if (!Number.isFinite(seconds) || seconds < 0) return '--';
  const s = Math.floor(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, '0')}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, '0')}m`;
  return `${Math.floor(s / 86400)}d${String(Math.floor((s % 86400) / 3600)).padStart(2, '0')}h`;
}

const SI = ['', 'k', 'M', 'G', 'T', 'P'];

/** Three significant digits with an SI suffix: 0.123, 12.3, 999, 1.23k, 45.6M. */
export function formatSI(n: number): string {
  if (!Number.isFinite(n)) return String(n);
  if (n === 0) return '0';
  const sign = n < 0 ? '-' : '';
  let a = Math.abs(n);
  let k = 0;
  while (k < SI.length - 1 && Number(a.toPrecision(3)) >= 1000) {
    a /= 1000;
    k++;
  }
  const digits = a >= 100 ? 0 : a >= 10 ? 1 : 2;
  return `${sign}${a.toFixed(k === 0 && a >= 1000 ? 0 : digits)}${SI[k]}`;
}

/** A count: exact below 10 000, else SI ("12.3k", "1.50M"). */
export function formatCount(n: number): string {
  return Number.isInteger(n) && Math.abs(n) < 10_000 ? String(n) : formatSI(n);
}

/**
 * A rate: "1.23k tok/s" (SI, three digits); below 1 per second the inverse, "2.50 s/step"; "--" when
 * unknown (NaN, Infinity, negative).
 */
export function formatRate(perSecond: number, unit = 'it'): string {
  if (!Number.isFinite(perSecond) || perSecond < 0) return `-- ${unit}/s`;
  if (perSecond === 0) return `0 ${unit}/s`;
  if (perSecond < 1) return `${formatSI(1 / perSecond)} s/${unit}`;
  return `${formatSI(perSecond)} ${unit}/s`;
}

function formatExtra(v: string | number): string {
  if (typeof v === 'number') {
    if (Number.isInteger(v) && Math.abs(v) < 1e9) return String(v);
    if (!Number.isFinite(v)) return String(v);
    const a = Math.abs(v);
    if (a >= 1e-3 && a < 1e5) return String(Number(v.toPrecision(4)));
    return v.toExponential(2).replace(/\.?0+e/, 'e').replace('e+', 'e');
  }
  return String(v);
}

/** Replaces control characters (a stray \n or escape would break the single line). */
function oneLine(s: string): string {
  return s.replace(/[\u0000-\u001f\u007f-\u009f]/g, ' ');
}

function checkNumber(name: string, v: unknown, ok: (x: number) => boolean, want: string): void {
  if (v !== undefined && (typeof v !== 'number' || !ok(v))) throw new ArgumentError(`Progress: ${name} must be ${want}, got ${JSON.stringify(v)}`);
}

/** A progress line (see the file comment for the TTY / log behaviour). */
export class Progress {
  /** Units in all (0 when unknown). */
  readonly total: number;
  readonly label: string;
  readonly unit: string;
  private readonly stream: ProgressStream;
  private readonly tty: boolean;
  private readonly intervalMs: number;
  private readonly redrawMs: number;
  private readonly now: () => number;
  private readonly t0: number;
  private done = 0;
  private extra: Record<string, string | number> = {};
  private lastDraw = -Infinity;
  private lastLine = -Infinity;
  private samples: { t: number; done: number }[] = [];
  private lastT: number;
  private finished = false;

  /** @param opts see {@link ProgressOptions}. */
  constructor(opts: ProgressOptions) {
    if (opts === null || typeof opts !== 'object') throw new ArgumentError('Progress: options { label, total?, ... } are required');
    if (typeof opts.label !== 'string') throw new ArgumentError(`Progress: label must be a string, got ${typeof opts.label}`);
    checkNumber('total', opts.total, (x) => Number.isFinite(x) && x >= 0, 'a finite number >= 0 (0 = unknown)');
    checkNumber('intervalS', opts.intervalS, (x) => Number.isFinite(x) && x > 0, 'a number of seconds > 0');
    checkNumber('redrawMs', opts.redrawMs, (x) => Number.isFinite(x) && x >= 0, 'a number of milliseconds >= 0');
    if (opts.unit !== undefined && typeof opts.unit !== 'string') throw new ArgumentError(`Progress: unit must be a string, got ${typeof opts.unit}`);
    this.total = opts.total ?? 0;
    this.label = oneLine(opts.label);
    this.unit = oneLine(opts.unit ?? 'it');
    this.stream = opts.stream ?? process.stderr;
    if (typeof this.stream?.write !== 'function') throw new ArgumentError('Progress: stream must have a write(string) method');
    this.tty = opts.tty ?? this.stream.isTTY === true;
    this.intervalMs = (opts.intervalS ?? 10) * 1000;
    this.redrawMs = opts.redrawMs ?? 100;
    this.now = opts.now ?? (() => performance.now());
    this.t0 = this.now();
    this.lastT = this.t0;
    this.lastLine = this.t0;
    this.samples.push({ t: this.t0, done: 0 });
  }

  /**
   * Records progress and redraws / prints when due.
   * @param done units finished so far (absolute, not an increment), finite and >= 0.
   * @param extra fields shown after the ETA as key=value (numbers get 4 significant digits); they
   *   replace the previous ones.
   */
  update(done: number, extra?: Record<string, string | number>): void {
    if (typeof done !== 'number' || !Number.isFinite(done) || done < 0) throw new ArgumentError(`Progress.update: done must be a finite number >= 0, got ${JSON.stringify(done)}`);
    if (this.finished) return;
    this.done = done;
    if (extra !== undefined) this.extra = extra;
    const t = this.now();
    this.lastT = t;
    const last = this.samples[this.samples.length - 1];
    if (t - last.t >= SAMPLE_MS) {
      this.samples.push({ t, done });
      while (this.samples.length > 2 && t - this.samples[1].t >= WINDOW_MS) this.samples.shift();
    }
    if (this.tty) {
      if (t - this.lastDraw >= this.redrawMs) {
        this.lastDraw = t;
        this.stream.write(`\r${this.fit(this.line(t, true))}\x1b[K`);
      }
    } else if (t - this.lastLine >= this.intervalMs) {
      this.lastLine = t;
      this.stream.write(this.line(t, false) + '\n');
    }
  }

  /** Writes the final line (TTY: redrawn, then a newline). Later calls of update/finish do nothing. */
  finish(extra?: Record<string, string | number>): void {
    if (this.finished) return;
    if (extra !== undefined) this.extra = extra;
    const t = this.now();
    this.finished = true;
    if (this.tty) this.stream.write(`\r${this.fit(this.line(t, true, true))}\x1b[K\n`);
    else this.stream.write(this.line(t, false, true) + '\n');
  }

  /** Units per second over the recent window (up to the last update); NaN until 250 ms of history exist. */
  rate(): number {
    const a = this.samples[0];
    const dt = this.lastT - a.t;
    return dt >= SAMPLE_MS ? ((this.done - a.done) * 1000) / dt : NaN;
  }

  /** The status line as it would be printed now (without control characters). */
  line(t = this.now(), tty = this.tty, final = false): string {
    const parts: string[] = [this.label];
    const elapsed = (t - this.t0) / 1000;
    const known = this.total > 0;
    if (known) {
      const frac = Math.min(1, this.done / this.total);
      if (tty) {
        const W = 20;
        const full = Math.floor(frac * W);
        parts.push(`[${'█'.repeat(full)}${'░'.repeat(W - full)}]`);
      }
      parts.push(`${(frac * 100).toFixed(1)}%`);
      parts.push(`${formatCount(this.done)}/${formatCount(this.total)} ${this.unit}`);
    } else {
      parts.push(`${formatCount(this.done)} ${this.unit}`);
    }
    if (final) {
      parts.push(formatRate(elapsed > 0 ? this.done / elapsed : NaN, this.unit));
      parts.push(`in ${formatDuration(elapsed)}`);
    } else {
      const r = this.rate();
      parts.push(formatRate(r, this.unit));
      if (!tty) parts.push(`elapsed ${formatDuration(elapsed)}`);
      if (known) parts.push(`ETA ${r > 0 ? formatDuration(Math.max(0, this.total - this.done) / r) : '--'}`);
    }
    for (const [k, v] of Object.entries(this.extra)) parts.push(`${oneLine(k)}=${oneLine(formatExtra(v))}`);
    return parts.join(' ');
  }

  private fit(s: string): string {
    const cols = this.stream.columns && this.stream.columns > 10 ? this.stream.columns : 80;
    const chars = Array.from(s);
    return chars.length <= cols - 1 ? s : chars.slice(0, cols - 2).join('') + '…';
  }
}
