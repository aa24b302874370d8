#!/usr/bin/env node
/** bootrestore command-line entry point: one file per command under ./commands. */
import { UsageError } from './args.js';

interface CommandModule {
  run(argv: string[]): Promise<number>;
}

/** Command name → lazy loader (keeps start-up fast and commands independent). */
const commands: Record<string, { summary: string; load: () => Promise<CommandModule> }> = {
  serve: { summary: 'serve the targets of a config file over iSCSI', load: () => import('./commands/serve.js') },
  backup: { summary: 'back up a disk image (raw, qcow2, VMDK) into a repository', load: () => import('./commands/backup.js') },
  list: { summary: 'list restore points', load: () => import('./commands/list.js') },
  verify: { summary: 'verify every chunk referenced by restore points', load: () => import('./commands/verify.js') },
  prune: { summary: 'delete old restore points of a VM', load: () => import('./commands/prune.js') },
  gc: { summary: 'remove chunks no restore point references', load: () => import('./commands/gc.js') },
  export: { summary: 'write a restore point back to a raw image', load: () => import('./commands/export.js') },
  mount: { summary: 'mount a restore point as a LUN (writable unless --read-only)', load: () => import('./commands/mount.js') },
  mounts: { summary: 'list mounts with delta size and cache statistics', load: () => import('./commands/mounts.js') },
  unmount: { summary: 'remove a mount (--discard or --keep its delta)', load: () => import('./commands/unmount.js') },
  commit: { summary: 'turn a mount\'s base + delta into a new restore point', load: () => import('./commands/commit.js') },
};

function usage(): string {
  const lines = ['usage: bootrestore <command> [options]', '', 'commands:'];
  for (const [name, c] of Object.entries(commands)) lines.push(`  ${name.padEnd(9)} ${c.summary}`);
  lines.push('', 'Run "bootrestore <command> --help" for a command\'s options.');
  return lines.join('\n');
}

async function main(argv: string[]): Promise<number> {
  const [name, ...rest] = argv;
  if (name === undefined) {
    process.stderr.write(usage() + '\n');
    return 2;
  }
  if (name === '--help' || name === '-h' || name === 'help') {
    process.stdout.write(usage() + '\n');
    return 0;
  }
  const command = commands[name];
  if (!command) {
    process.stderr.write(`bootrestore: unknown command "${name}"\n\n${usage()}\n`);
    return 2;
  }
  const mod = await command.load();
  return mod.run(rest);
}

process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(process.exitCode ?? 0);
  throw err;
});

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err: unknown) => {
    if (err instanceof UsageError) {
      process.stderr.write(`bootrestore: ${err.message}\n`);
      process.exitCode = 2;
    } else {
      process.stderr.write(`bootrestore: ${err instanceof Error ? err.message : String(err)}\n`);
      process.exitCode = 1;
    }
  },
);
