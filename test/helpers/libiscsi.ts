/**
 * Runs libiscsi's command-line tools (Debian package libiscsi-bin 1.19) against a target and
 * parses what they print. The parsers are plain functions so unit tests can feed them real output.
 */
import { runCommand, type CommandResult } from './exec.js';

// ---------------------------------------------------------------------------------------------
// iscsi-test-cu (the conformance suite)
// ---------------------------------------------------------------------------------------------

export interface ConformanceTest {
  /** "Suite.Test", e.g. "GetLBAStatus.BeyondEol". */
  name: string;
  result: 'passed' | 'failed' | 'skipped';
  /** The [SKIPPED] / [FAILED] reasons and CUnit assertion lines printed for this test. */
  details: string[];
}

export interface ConformanceSummary {
  /** Tests that passed without any [SKIPPED] line (CUnit counts skips as passed; we do not). */
  passed: number;
  failed: number;
  /** Tests that printed at least one [SKIPPED] line and did not fail. */
  skipped: number;
  total: number;
  failedTests: string[];
  skippedTests: string[];
  tests: ConformanceTest[];
  /** CUnit's own "Run Summary" tests row, when printed: used to cross-check the per-test parse. */
  cunit?: { total: number; ran: number; passed: number; failed: number; inactive: number };
}

/**
 * Parses `iscsi-test-cu -v` output: "Suite: S" lines, then per test "  Test: T ..." followed
 * (same line or later lines) by "passed" or "FAILED"; "[SKIPPED]" lines in between mark a skip.
 */
export function parseConformanceOutput(output: string): ConformanceSummary {
  const tests: ConformanceTest[] = [];
  let suite = '';
  let current: ConformanceTest | undefined;
  let sawSkip = false;
  let cunit: ConformanceSummary['cunit'];

  const finishCurrent = (outcome: 'passed' | 'failed'): void => {
    if (!current) return;
    current.result = outcome === 'failed' ? 'failed' : sawSkip ? 'skipped' : 'passed';
    tests.push(current);
    current = undefined;
    sawSkip = false;
  };
  /** Handles the text after "Test: T ..." or a whole following line. */
  const consume = (text: string): void => {
    const trimmed = text.trim();
    if (trimmed === '') return;
    // The verdict comes first; text after it on the same line belongs to a suite teardown
    // (seen: "Test: LUNReset ...passed    [FAILED] PRIN command: ..."), not to this test.
    const verdict = /^(passed|FAILED)\b/.exec(trimmed);
    if (verdict && current) {
      finishCurrent(verdict[1] === 'FAILED' ? 'failed' : 'passed');
      return;
    }
    if (trimmed.includes('[SKIPPED]')) {
      sawSkip = true;
      current?.details.push(trimmed);
      return;
    }
    if (trimmed.includes('[FAILED]')) {
      current?.details.push(trimmed);
      return;
    }
    // CUnit assertion lines ("1. file.c:38  - CU_ASSERT...") belong to the test that just failed.
    const last = tests.at(-1);
    if (!current && last?.result === 'failed' && /^\d+\.\s/.test(trimmed)) last.details.push(trimmed);
    else current?.details.push(trimmed);
  };

  for (const rawLine of output.split('\n')) {
    const line = rawLine.replace(/\r$/, '');
    const suiteMatch = /^Suite: (.+)$/.exec(line);
    if (suiteMatch) {
      suite = suiteMatch[1]!.trim();
      continue;
    }
    const testMatch = /^\s+Test: (\S+) \.\.\.(.*)$/.exec(line);
    if (testMatch) {
      current = { name: `${suite}.${testMatch[1]!}`, result: 'passed', details: [] };
      sawSkip = false;
      consume(testMatch[2]!);
      continue;
    }
    const summaryMatch = /^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*$/.exec(line);
    if (summaryMatch) {
      const [total, ran, passed, failed, inactive] = summaryMatch.slice(1, 6).map(Number) as [number, number, number, number, number];
      cunit = { total, ran, passed, failed, inactive };
      continue;
    }
    if (/^Run Summary:/.test(line) || /^\s+(suites|asserts)\s/.test(line)) continue;
    if (current || /^\s+\d+\.\s/.test(line)) consume(line);
  }
  // A test cut off by a crash or a timeout counts as failed.
  if (current) finishCurrent('failed');

  const failedTests = tests.filter((t) => t.result === 'failed').map((t) => t.name);
  const skippedTests = tests.filter((t) => t.result === 'skipped').map((t) => t.name);
  const summary: ConformanceSummary = {
    passed: tests.length - failedTests.length - skippedTests.length,
    failed: failedTests.length,
    skipped: skippedTests.length,
    total: tests.length,
    failedTests,
    skippedTests,
    tests,
  };
  if (cunit) summary.cunit = cunit;
  return summary;
}

export interface ConformanceOptions {
  /** Regular expression FAMILY[.SUITE[.TEST]] (default ALL). */
  tests?: string;
  /** Allow destructive (write) tests: -d. Default true. */
  dataloss?: boolean;
  /** A second URL to the same LUN enables the MultipathIO tests. */
  multipathUrl?: string;
  initiatorName?: string;
  initiatorName2?: string;
  timeoutMs?: number;
}

export interface ConformanceRun extends ConformanceSummary {
  exitCode: number | null;
  timedOut: boolean;
  elapsedMs: number;
  output: string;
}

/** Runs `iscsi-test-cu [-d] -t TESTS -v URL [URL2]` and parses the result. */
export async function runConformance(url: string, opts: ConformanceOptions = {}): Promise<ConformanceRun> {
  const args: string[] = [];
  if (opts.dataloss ?? true) args.push('-d');
  if (opts.initiatorName) args.push('-i', opts.initiatorName);
  if (opts.initiatorName2) args.push('-I', opts.initiatorName2);
  args.push('-t', opts.tests ?? 'ALL', '-v', url);
  if (opts.multipathUrl) args.push(opts.multipathUrl);
  const result = await runCommand('iscsi-test-cu', args, { timeoutMs: opts.timeoutMs ?? 300_000 });
  const output = result.stdout + result.stderr;
  return { ...parseConformanceOutput(output), exitCode: result.exitCode, timedOut: result.timedOut, elapsedMs: result.elapsedMs, output };
}

// ---------------------------------------------------------------------------------------------
// iscsi-ls, iscsi-inq, iscsi-readcapacity16
// ---------------------------------------------------------------------------------------------

export interface ListedTarget {
  iqn: string;
  portal: string;
  luns: Array<{ lun: number; type: string; size?: string }>;
}

/** Parses `iscsi-ls -s` ("Target:IQN Portal:ADDR,TPGT" then "Lun:N    Type:T (Size:S)"). */
export function parseIscsiLs(output: string): ListedTarget[] {
  const targets: ListedTarget[] = [];
  for (const line of output.split('\n')) {
    const target = /^Target:(\S+) Portal:(\S+)/.exec(line);
    if (target) {
      targets.push({ iqn: target[1]!, portal: target[2]!, luns: [] });
      continue;
    }
    const lun = /^\s*Lun:(\d+)\s+Type:(\S+)(?:\s+\(Size:([^)]+)\))?/.exec(line);
    if (lun && targets.length > 0) {
      const entry: ListedTarget['luns'][number] = { lun: Number(lun[1]), type: lun[2]! };
      if (lun[3] !== undefined) entry.size = lun[3];
      targets.at(-1)!.luns.push(entry);
    }
  }
  return targets;
}

/** `iscsi-ls -s iscsi://host:port`: discovery, then a login to each target to list its LUNs. */
export async function iscsiLs(portalUrl: string, opts: { initiatorName?: string; timeoutMs?: number } = {}): Promise<{ targets: ListedTarget[]; result: CommandResult }> {
  const args = ['-s'];
  if (opts.initiatorName) args.push('-i', opts.initiatorName);
  args.push(portalUrl);
  const result = await runCommand('iscsi-ls', args, { timeoutMs: opts.timeoutMs ?? 30_000 });
  return { targets: parseIscsiLs(result.stdout), result };
}

/**
 * Parses iscsi-inq's "Key:Value" lines. Repeated keys (e.g. "Version Descriptor") collect into
 * `repeated`; `fields` keeps the first value of each key.
 */
export function parseKeyValueLines(output: string): { fields: Record<string, string>; repeated: Record<string, string[]> } {
  const fields: Record<string, string> = {};
  const repeated: Record<string, string[]> = {};
  for (const line of output.split('\n')) {
    const match = /^\s*([A-Za-z][^:]*?)\s*:\s?(.*)$/.exec(line);
    if (!match) continue;
    const key = match[1]!;
    const value = match[2]!.trimEnd();
    (repeated[key] ??= []).push(value);
    if (!(key in fields)) fields[key] = value;
  }
  return { fields, repeated };
}

/** `iscsi-inq [-e 1 -c PAGE] URL`: standard INQUIRY, or the VPD page given in decimal (SPC-4 7.8). */
export async function iscsiInq(url: string, opts: { vpdPage?: number; initiatorName?: string; timeoutMs?: number } = {}): Promise<ReturnType<typeof parseKeyValueLines> & { result: CommandResult }> {
  const args: string[] = [];
  if (opts.initiatorName) args.push('-i', opts.initiatorName);
  // The page code must be decimal: `-c 0x83` silently shows page 0 (testing-here.md).
  if (opts.vpdPage !== undefined) args.push('-e', '1', '-c', String(opts.vpdPage));
  args.push(url);
  const result = await runCommand('iscsi-inq', args, { timeoutMs: opts.timeoutMs ?? 30_000 });
  return { ...parseKeyValueLines(result.stdout), result };
}

export interface ReadCapacity16 {
  lastLba: number;
  blockLength: number;
  totalBytes: number;
  lbpme: number;
  lbprz: number;
  logicalBlocksPerPhysicalExponent: number;
  lowestAlignedLba: number;
}

/** Parses `iscsi-readcapacity16` output (SBC-3 5.16 READ CAPACITY(16) parameter data). */
export function parseReadCapacity16(output: string): ReadCapacity16 {
  const number = (pattern: RegExp, what: string): number => {
    const match = pattern.exec(output);
    if (!match) throw new Error(`iscsi-readcapacity16 output has no ${what}:\n${output.slice(0, 2000)}`);
    return Number(match[1]);
  };
  return {
    lastLba: number(/RETURNED LOGICAL BLOCK ADDRESS:(\d+)/, 'RETURNED LOGICAL BLOCK ADDRESS'),
    blockLength: number(/LOGICAL BLOCK LENGTH IN BYTES:(\d+)/, 'LOGICAL BLOCK LENGTH'),
    totalBytes: number(/Total size:(\d+)/, 'Total size'),
    lbpme: number(/LBPME:(\d+)/, 'LBPME'),
    lbprz: number(/LBPRZ:(\d+)/, 'LBPRZ'),
    logicalBlocksPerPhysicalExponent: number(/LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT:(\d+)/, 'LBPPBE'),
    lowestAlignedLba: number(/LOWEST ALIGNED LOGICAL BLOCK ADDRESS:(\d+)/, 'LOWEST ALIGNED LBA'),
  };
}

export async function iscsiReadCapacity16(url: string, opts: { initiatorName?: string; timeoutMs?: number } = {}): Promise<ReadCapacity16 & { result: CommandResult }> {
  const args: string[] = [];
  if (opts.initiatorName) args.push('-i', opts.initiatorName);
  args.push(url);
  const result = await runCommand('iscsi-readcapacity16', args, { timeoutMs: opts.timeoutMs ?? 30_000 });
  if (result.exitCode !== 0) throw new Error(`iscsi-readcapacity16 ${url}: exit ${result.exitCode}\n${result.stderr}${result.stdout}`);
  return { ...parseReadCapacity16(result.stdout), result };
}

// ---------------------------------------------------------------------------------------------
// iscsi-perf
// ---------------------------------------------------------------------------------------------

export interface PerfResult {
  /** Average I/O requests per second over the whole run (iscsi-perf's final "iops average"). */
  iops: number;
  /** Average MiB/s (iscsi-perf prints "MB/s" but divides by 2^20). */
  mibPerSecond: number;
  /** The per-second "iops current" samples. */
  samples: number[];
  capacityBytes?: number;
}

/**
 * Parses iscsi-perf's output: progress lines separated by carriage returns
 * ("00:00:02 - lba N, iops current A (B MB/s), iops average C (D MB/s), in_flight 8, busy 0")
 * and a final "iops average C (D MB/s)" line before "finished.".
 */
export function parseIscsiPerf(output: string): PerfResult {
  const lines = output.split(/[\r\n]+/).map((l) => l.trim());
  const samples: number[] = [];
  let final: { iops: number; mib: number } | undefined;
  for (const line of lines) {
    const progress = /iops current (\d+) \((\d+) MB\/s\)/.exec(line);
    if (progress) {
      samples.push(Number(progress[1]));
      continue;
    }
    const average = /^iops average (\d+) \((\d+) MB\/s\)/.exec(line);
    if (average) final = { iops: Number(average[1]), mib: Number(average[2]) };
  }
  // Stopped by SIGINT (see runIscsiPerf): no final line, but every progress line ends with the running
  // average so far; take the last one.
  if (!final) {
    for (const line of lines) {
      const running = /iops current \d+ \(\d+ MB\/s\), iops average (\d+) \((\d+) MB\/s\)/.exec(line);
      if (running) final = { iops: Number(running[1]), mib: Number(running[2]) };
    }
  }
  if (!final) throw new Error(`iscsi-perf output has no final "iops average" line:\n${output.slice(-2000)}`);
  const result: PerfResult = { iops: final.iops, mibPerSecond: final.mib, samples };
  const capacity = /capacity is \d+ blocks or (\d+) byte/.exec(output);
  if (capacity) result.capacityBytes = Number(capacity[1]);
  return result;
}

export interface PerfOptions {
  /** Outstanding requests (-m). */
  queueDepth: number;
  /** Blocks per request (-b). */
  blocksPerRequest: number;
  /** Seconds to run (-t). */
  seconds: number;
  random: boolean;
  initiatorName?: string;
}

/** Grace after `-t` seconds before iscsi-perf is told to stop with SIGINT (see runIscsiPerf). */
export const ISCSI_PERF_STOP_GRACE_MS = 5000;

/**
 * Runs iscsi-perf (reads only) and parses its result; throws if it fails.
 *
 * iscsi-perf (libiscsi 1.19 utils/iscsi-perf.c, progress()) stops only if a progress print, made at the
 * first completion at least 1 s after the previous one, falls in the second [t, t+1) of its `-t t`
 * runtime; if none does (no completion in that window, e.g. slow reads on a busy machine) its unsigned
 * remaining time wraps below zero and it reads forever. Its SIGINT handler makes it stop issuing, drain
 * and exit 0, so it gets SIGINT if it still runs `ISCSI_PERF_STOP_GRACE_MS` after its runtime.
 */
export async function runIscsiPerf(
  url: string,
  opts: PerfOptions,
): Promise<PerfResult & { elapsedMs: number; interrupted: boolean }> {
  const args = ['-m', String(opts.queueDepth), '-b', String(opts.blocksPerRequest), '-t', String(opts.seconds)];
  if (opts.random) args.push('-r');
  if (opts.initiatorName) args.push('-i', opts.initiatorName);
  args.push(url);
  const result = await runCommand('iscsi-perf', args, {
    timeoutMs: (opts.seconds + 60) * 1000,
    interruptAfterMs: opts.seconds * 1000 + ISCSI_PERF_STOP_GRACE_MS,
  });
  if (result.exitCode !== 0) {
    const how = `${result.exitCode ?? result.signal}${result.interrupted ? ' (after SIGINT)' : ''}`;
    throw new Error(`iscsi-perf ${args.join(' ')}: exit ${how}\n${result.stderr}${result.stdout.slice(-2000)}`);
  }
  return { ...parseIscsiPerf(result.stdout + result.stderr), elapsedMs: result.elapsedMs, interrupted: result.interrupted };
}
