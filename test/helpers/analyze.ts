/**
 * QEMU's scripts/analyze-migration.py as an independent oracle for `inspect --devices --json`:
 * runs it on a stream file and compares its state dump with ours field by field.
 *
 * The script is looked up at MULTIFD_ANALYZE_MIGRATION, else in the QEMU tree that
 * ../shared/qemu/get-source.sh extracts under /tmp/qemu-src (.ci/run runs it); tests skip when it
 * or python3 is missing.
 */
import { execFile, spawnSync } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';

function findScript(): string {
  const root = '/tmp/qemu-src';
  const trees = existsSync(root) ? readdirSync(root).filter((d) => d.startsWith('qemu-')).sort().reverse() : [];
  for (const t of trees) {
    const p = `${root}/${t}/scripts/analyze-migration.py`;
    if (existsSync(p)) return p;
  }
  return `${root}/qemu-<version>/scripts/analyze-migration.py`;
}

export const ANALYZE_SCRIPT = process.env.MULTIFD_ANALYZE_MIGRATION || findScript();

/** Why analyze-migration.py cannot run here, or undefined when it can. */
export function analyzeUnavailable(): string | undefined {
  if (!existsSync(ANALYZE_SCRIPT)) return `${ANALYZE_SCRIPT} not found (set MULTIFD_ANALYZE_MIGRATION)`;
  const r = spawnSync('python3', ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return 'python3 not available';
  return undefined;
}

/** The script's `-d state` dump, or its error text. */
export function runAnalyze(file: string): Promise<{ ok: true; state: Record<string, unknown> } | { ok: false; error: string }> {
  return new Promise((resolve) => {
    execFile('python3', [ANALYZE_SCRIPT, '-f', file], { maxBuffer: 256 << 20, timeout: 300_000 }, (err, stdout, stderr) => {
      if (err) {
        // The script wraps every failure in "Exception: Full JSON dump"; the first error line is the cause.
        const lines = stderr.trim().split('\n');
        const cause = lines.find((l) => /^\w+(Error|Exception): /.test(l) && !l.includes('Full JSON')) ?? lines.slice(-1)[0] ?? String(err);
        resolve({ ok: false, error: cause.slice(0, 500) });
        return;
      }
      resolve({ ok: true, state: JSON.parse(stdout) as Record<string, unknown> });
    });
  });
}

type Json = string | number | boolean | null | Json[] | { [k: string]: Json };

/**
 * Compares one analyze-migration value with ours. Theirs: integers as "0x%0Nx" (N = 2 × size;
 * negative ones get " (-n)"), opaque bytes as "00 01 …", bools as JSON bools, a one-element array
 * as its element. Ours: integers as numbers or decimal strings, bytes as plain hex.
 * Returns the paths that differ.
 */
export function compareAnalyzeValue(theirs: unknown, ours: Json | undefined, path: string, out: string[]): void {
  if (ours === undefined) {
    out.push(`${path}: missing in ours`);
    return;
  }
  if (Array.isArray(theirs)) {
    if (!Array.isArray(ours) || ours.length !== theirs.length) {
      out.push(`${path}: theirs is a list of ${theirs.length}, ours ${Array.isArray(ours) ? `a list of ${ours.length}` : typeof ours}`);
      return;
    }
    theirs.forEach((t, i) => compareAnalyzeValue(t, ours[i], `${path}[${i}]`, out));
    return;
  }
  if (Array.isArray(ours) && ours.length === 1) {
    compareAnalyzeValue(theirs, ours[0], path, out);
    return;
  }
  if (theirs !== null && typeof theirs === 'object') {
    if (ours === null || typeof ours !== 'object' || Array.isArray(ours)) {
      out.push(`${path}: theirs is an object, ours ${JSON.stringify(ours).slice(0, 60)}`);
      return;
    }
    const tk = Object.keys(theirs);
    const ok = Object.keys(ours);
    if (tk.join('\0') !== ok.join('\0')) out.push(`${path}: keys differ: theirs [${tk.join(', ')}] ours [${ok.join(', ')}]`);
    for (const k of tk) compareAnalyzeValue((theirs as Record<string, unknown>)[k], (ours as Record<string, Json>)[k], `${path}.${k}`, out);
    return;
  }
  if (typeof theirs === 'boolean') {
    if (ours !== theirs) out.push(`${path}: theirs ${theirs}, ours ${JSON.stringify(ours)}`);
    return;
  }
  if (typeof theirs === 'string') {
    const int = /^0x([0-9a-f]+)(?: \((-?\d+)\))?$/.exec(theirs);
    if (int && (typeof ours === 'number' || (typeof ours === 'string' && /^-?\d+$/.test(ours)))) {
      const bits = int[1]!.length * 4;
      const mine = BigInt.asUintN(bits, BigInt(ours));
      if (mine !== BigInt(`0x${int[1]}`)) out.push(`${path}: theirs ${theirs}, ours ${ours}`);
      return;
    }
    const bytes = theirs.replace(/ /g, '');
    if (/^([0-9a-f]{2})*$/.test(bytes) && typeof ours === 'string') {
      if (bytes !== ours) out.push(`${path}: bytes differ: theirs ${theirs.slice(0, 40)}…, ours ${ours.slice(0, 40)}…`);
      return;
    }
    if (theirs !== ours) out.push(`${path}: theirs ${JSON.stringify(theirs)}, ours ${JSON.stringify(ours)}`);
    return;
  }
  if (theirs !== ours) out.push(`${path}: theirs ${JSON.stringify(theirs)}, ours ${JSON.stringify(ours)}`);
}

export interface OurDevice {
  idstr: string;
  'section-id': number;
  fields?: { [k: string]: Json };
}

/**
 * Every device of the analyze dump against ours; the "ram (N)" entry (section sizes only) is
 * skipped. Returns the differences and how many leaf values agreed.
 */
export function compareWithAnalyze(state: Record<string, unknown>, devices: OurDevice[]): { differences: string[]; devices: number; leaves: number } {
  const differences: string[] = [];
  const byKey = new Map(devices.map((d) => [`${d.idstr} (${d['section-id']})`, d]));
  let n = 0;
  let leaves = 0;
  for (const [key, value] of Object.entries(state)) {
    if (/^ram \(\d+\)$/.test(key)) continue;
    const ours = byKey.get(key);
    if (!ours) {
      differences.push(`${key}: not among our devices`);
      continue;
    }
    n++;
    compareAnalyzeValue(value, ours.fields, key, differences);
    leaves += countLeaves(value);
  }
  if (n !== devices.length) differences.push(`analyze-migration dumped ${n} devices, we decoded ${devices.length}`);
  return { differences, devices: n, leaves };
}

function countLeaves(v: unknown): number {
  if (Array.isArray(v)) return v.reduce((n: number, x) => n + countLeaves(x), 0);
  if (v !== null && typeof v === 'object') return Object.values(v).reduce((n: number, x) => n + countLeaves(x), 0);
  return 1;
}
