/**
 * Durability of a mounted restore point's delta with a real initiator (qemu-io over libiscsi):
 * writes followed by a flush (SYNCHRONIZE CACHE) survive `kill -9` of the server and a restart;
 * writes in flight at the kill read back as either their old or their new content, never garbage.
 * Repeated at several kill points (right after a flush; during a burst of unflushed writes).
 */
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runChecked, runCommand, trackChild } from '../helpers/exec.js';
import { startServerProcess, type ServerProcess } from '../helpers/server.js';
import { makeTempDir, type TempDir } from '../helpers/tmp.js';
import { backupImage, writeTestImage } from '../helpers/repo.js';
import { xorshift32 } from '../helpers/prng.js';
import { spawn } from 'node:child_process';

const IQN = 'iqn.2026-12.io.bootrestore.test:durability';
const IMAGE_SIZE = 32 << 20;
const KiB = 1024;

let dir: TempDir;
let server: ServerProcess | undefined;
let config: Record<string, unknown>;
let base: Buffer;

beforeAll(async () => {
  dir = await makeTempDir('mount-durability');
  const image = join(dir.path, 'base.img');
  await writeTestImage(image, IMAGE_SIZE, 7);
  base = await readFile(image);
  const repo = join(dir.path, 'repo');
  const point = await backupImage(image, repo, 'dur');
  config = {
    repository: repo,
    deltaDir: join(dir.path, 'deltas'),
    cache: { maxBytes: '16MiB' },
    targets: [{ iqn: IQN, luns: [{ lun: 0, backup: { vm: 'dur', point } }] }],
  };
});

afterAll(async () => {
  await server?.stop();
  await dir?.remove();
});

interface Write {
  offset: number;
  length: number;
  pattern: number;
}

/** Deterministic scattered writes of 512 B … 64 KiB at 512-byte alignment, some crossing chunk edges. */
function writesForRound(round: number, count: number): Write[] {
  const next = xorshift32(0x1234567 + round * 7919);
  const out: Write[] = [];
  for (let i = 0; i < count; i++) {
    const sectors = 1 + (next() % 128);
    const offset = (next() % (IMAGE_SIZE / 512 - sectors)) * 512;
    out.push({ offset, length: sectors * 512, pattern: 1 + ((round * 31 + i) % 254) });
  }
  return out;
}

function qemuIoArgs(url: string, commands: string[]): string[] {
  const args = ['-f', 'raw'];
  for (const c of commands) args.push('-c', c);
  args.push(url);
  return args;
}

/** Read the whole LUN back. */
async function readLun(url: string): Promise<Buffer> {
  const out = join(dir.path, 'readback.img');
  await runChecked('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, out], { timeoutMs: 120_000 });
  return readFile(out);
}

describe('delta durability across kill -9', () => {
  it('flushed writes survive kill -9 at several points; unflushed ones are old or new, never garbage', async () => {
    const model = Buffer.from(base); // what every flushed write made the LUN look like
    for (let round = 1; round <= 3; round++) {
      server = await startServerProcess(config);
      const url = server.url(0);

      // Acknowledged and flushed: must survive.
      const flushed = writesForRound(round, 40);
      const cmds = flushed.map((w) => `write -P ${w.pattern} ${w.offset} ${w.length}`);
      cmds.push('flush');
      const r = await runCommand('qemu-io', qemuIoArgs(url, cmds), { timeoutMs: 120_000 });
      expect(r.exitCode, r.stderr + r.stdout).toBe(0);
      for (const w of flushed) model.fill(w.pattern, w.offset, w.offset + w.length);

      // Then, in rounds 2 and 3, a burst of unflushed writes that the kill interrupts.
      let inFlight: Write[] = [];
      if (round >= 2) {
        inFlight = writesForRound(100 + round, 200);
        const child = spawn('qemu-io', qemuIoArgs(url, inFlight.map((w) => `write -P ${w.pattern} ${w.offset} ${w.length}`)), { stdio: 'ignore' });
        trackChild(child);
        await new Promise((res) => setTimeout(res, round === 2 ? 600 : 1200));
        await server.kill9();
        child.kill('SIGKILL');
      } else {
        await server.kill9();
      }
      server = undefined;

      // Restart over the same delta: every flushed write is there; every in-flight write's range
      // holds, per 512-byte sector, either the old content or the write's pattern.
      server = await startServerProcess(config);
      const lun = await readLun(server.url(0));
      expect(lun.length).toBe(IMAGE_SIZE);
      const inFlightSectors = new Map<number, number[]>();
      for (const w of inFlight) {
        for (let s = w.offset; s < w.offset + w.length; s += 512) {
          const list = inFlightSectors.get(s) ?? [];
          list.push(w.pattern);
          inFlightSectors.set(s, list);
        }
      }
      let newSectors = 0;
      for (let s = 0; s < IMAGE_SIZE; s += 512) {
        const got = lun.subarray(s, s + 512);
        const expected = model.subarray(s, s + 512);
        if (got.equals(expected)) continue;
        const patterns = inFlightSectors.get(s);
        const ok = patterns?.some((p) => got.every((b) => b === p)) ?? false;
        if (!ok) throw new Error(`round ${round}: sector at byte ${s} is neither its flushed content nor an in-flight write's pattern`);
        newSectors++;
      }
      // Adopt what the restart shows for in-flight sectors as the new model (they are now durable
      // only once flushed again: flush through a fresh session before the next round).
      lun.copy(model);
      const f = await runCommand('qemu-io', qemuIoArgs(server.url(0), ['flush']), { timeoutMs: 60_000 });
      expect(f.exitCode, f.stderr).toBe(0);
      console.info(`round ${round}: ${flushed.length} flushed writes intact; ${newSectors} of ${inFlightSectors.size} in-flight sectors had landed`);
      await server.kill9();
      server = undefined;
    }
    // The base restore point itself never changed: the LUN differs from it only where we wrote.
    expect(model.equals(base)).toBe(false);
  });

  it('a small write into an untouched 4 KiB unit keeps the rest of the unit (read-modify-write from the backup)', async () => {
    server = await startServerProcess(config);
    const url = server.url(0);
    const before = await readLun(url);
    const offset = 20 * (1 << 20) + 3 * 512 + 7 * 4096; // inside a unit, not at its start
    const r = await runCommand('qemu-io', qemuIoArgs(url, [`write -P 0x5a ${offset} 512`, 'flush']), { timeoutMs: 60_000 });
    expect(r.exitCode, r.stderr).toBe(0);
    await server.kill9();
    server = await startServerProcess(config);
    const after = await readLun(server.url(0));
    const expected = Buffer.from(before);
    expected.fill(0x5a, offset, offset + 512);
    expect(after.subarray(offset - 4 * KiB, offset + 4 * KiB).equals(expected.subarray(offset - 4 * KiB, offset + 4 * KiB))).toBe(true);
    expect(after.equals(expected)).toBe(true);
    await server.stop();
    server = undefined;
  });
});
