/**
 * A CLI entry with only the backup-related commands, for tests that run them in a child process
 * while other commands of src/cli/main.ts may be mid-edit. Same dispatch and exit codes as main.ts.
 */
import { UsageError } from '../../src/cli/args.js';

interface CommandModule {
  run(argv: string[]): Promise<number>;
}

const commands: Record<string, () => Promise<CommandModule>> = {
  backup: () => import('../../src/cli/commands/backup.js'),
  list: () => import('../../src/cli/commands/list.js'),
  verify: () => import('../../src/cli/commands/verify.js'),
  prune: () => import('../../src/cli/commands/prune.js'),
  gc: () => import('../../src/cli/commands/gc.js'),
  export: () => import('../../src/cli/commands/export.js'),
};

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  const load = name === undefined ? undefined : commands[name];
  if (load === undefined) {
    process.stderr.write(`unknown command "${name ?? ''}"\n`);
    return 2;
  }
  return (await load()).run(rest);
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    process.stderr.write(`bootrestore: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = err instanceof UsageError ? 2 : 1;
  },
);
