/**
 * The shape of one `bts` subcommand. Each command lives in lib/cli/<name>.ts, parses its own flags
 * (node:util parseArgs), prints its full help for `-h/--help`, and returns the process exit code.
 * lib/cli.ts only dispatches: it lists the commands' one-line summaries in `bts --help` and maps a
 * thrown BtsError to one clear line on stderr (exit code 1), so commands throw typed errors instead of
 * printing and exiting themselves.
 */
export interface CliCommand {
  /** The word after `bts`. */
  name: string;
  /** One line for the command list of `bts --help`. */
  summary: string;
  /** The full text printed by `bts <name> --help` (usage, every option with its default). */
  help: string;
  /** Runs the command with the arguments after its name; resolves to the exit code. */
  run(argv: string[]): Promise<number>;
}
