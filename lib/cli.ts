#!/usr/bin/env node
/**
 * The `bts` command line. Each command parses its own flags and has `--help`.
 * Commands so far: `bts info` (backend facts: SIMD level, threads, build, ops).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { packageRoot, native } from './native.js';
import { info } from './runtime.js';
import { BtsError } from './errors.js';
import type { CliCommand } from './cli/command.js';
import { tokenizerCommand } from './cli/tokenizer.js';
import { generateCommand } from './cli/generate.js';
import { evalCommand, pretrainCommand, trainCommand } from './cli/train.js';
import { branchCommand, gatesCommand, mergeCommand, stitchCommand } from './cli/stitch.js';
import { demoCommand } from './cli/demo.js';
import { dataCommand } from './cli/data.js';

const version = (JSON.parse(readFileSync(join(packageRoot, 'package.json'), 'utf8')) as { version: string }).version;

const mainHelpTemplate = `bts ${version}: Branch-Train-Stitch for Node

Usage: bts <command> [options]

Commands:
  info        Show the native backend: SIMD level in use, CPU features, threads, build, ops
@COMMANDS@

Run 'bts <command> --help' for the options of a command.
Environment: BTS_SIMD=reference|scalar|avx2|avx512 forces a SIMD level, BTS_THREADS=n the thread count.`;

const infoHelp = `Usage: bts info [--json] [--ops]

Shows the SIMD level in use (and the levels this CPU supports), CPU features, the number of compute
threads, the native build and where it was loaded from.

Options:
  --json   print machine-readable JSON
  --ops    also list the native ops with their arguments
  -h, --help`;

function cmdInfo(argv: string[]): number {
  const { values } = parseArgs({ args: argv, options: { json: { type: 'boolean' }, ops: { type: 'boolean' }, help: { type: 'boolean', short: 'h' } } });
  if (values.help) {
    console.log(infoHelp);
    return 0;
  }
  const i = info();
  const ops = values.ops ? native().listOps() : undefined;
  if (values.json) {
    console.log(JSON.stringify({ version, ...i, ...(ops ? { ops } : {}) }, null, 2));
    return 0;
  }
  const features = Object.entries(i.cpu)
    .filter(([k, v]) => k !== 'brand' && v === true)
    .map(([k]) => k);
  console.log(`branch-train-stitch ${version}`);
  console.log(`  cpu        ${i.cpu.brand || 'unknown'} (${features.join(' ') || 'baseline x86-64'})`);
  console.log(`  simd       ${i.simd} (best for this CPU: ${i.bestSimd}; available: ${i.simdLevels.join(', ')})`);
  console.log(`  threads    ${i.threads}`);
  console.log(`  build      ${i.build.compiler}, Node-API ${i.build.napiVersion}, levels ${i.build.compiledLevels}, cuda ${i.build.cuda ? 'yes' : 'no'}`);
  console.log(`  binary     ${i.binary}`);
  if (ops) {
    console.log('  ops');
    for (const o of ops) console.log(`    ${o.name}(${o.tensors.map((t) => `${t.name}${t.optional ? '?' : ''}: ${t.dtype}`).join(', ')}; ${o.scalars.join(', ')})`);
  }
  return 0;
}

/** Every subcommand besides `info`, in the order `bts --help` lists them. */
const modules: CliCommand[] = [demoCommand, dataCommand, tokenizerCommand, pretrainCommand, trainCommand, branchCommand, stitchCommand, generateCommand, evalCommand, gatesCommand, mergeCommand];

const commands: Record<string, (argv: string[]) => number | Promise<number>> = { info: cmdInfo };
for (const m of modules) commands[m.name] = (argv) => m.run(argv);
const mainHelp = mainHelpTemplate.replace('@COMMANDS@', modules.map((m) => `  ${m.name.padEnd(11)} ${m.summary}`).join('\n'));

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (!cmd || cmd === '-h' || cmd === '--help' || cmd === 'help') {
    console.log(mainHelp);
    return cmd ? 0 : 1;
  }
  if (cmd === '--version' || cmd === '-v') {
    console.log(version);
    return 0;
  }
  const run = commands[cmd];
  if (!run) {
    console.error(`bts: unknown command '${cmd}'\n\n${mainHelp}`);
    return 2;
  }
  try {
    return await run(rest);
  } catch (e) {
    if (e instanceof BtsError) {
      console.error(`bts ${cmd}: ${e.message} [${e.code}]`);
      return 1;
    }
    if (e instanceof TypeError && (e as { code?: string }).code?.startsWith('ERR_PARSE_ARGS')) {
      console.error(`bts ${cmd}: ${e.message}\nRun 'bts ${cmd} --help' for usage.`);
      return 2;
    }
    throw e;
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (e: unknown) => {
    console.error(e);
    process.exitCode = 1;
  },
);
