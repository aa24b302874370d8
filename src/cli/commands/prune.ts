// PLACEHOLDER: the "prune" command is being written; it is not available in this build.
export async function run(_argv: string[]): Promise<number> {
  process.stderr.write('bootrestore prune: not available in this build yet\n');
  return 70;
}
