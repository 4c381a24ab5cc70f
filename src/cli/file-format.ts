// Text renderings of inspect, verify, convert and extract results; no protocol logic.

import { structToLines } from '../codec/device-fields.js';
import type { Problem } from '../conversations/file-layout.js';
import type { ConvertSummary } from '../conversations/convert.js';
import type { ExtractSummary } from '../conversations/extract.js';
import type { InspectResult, InspectSection } from '../conversations/inspect.js';
import type { VerifyResult } from '../conversations/verify.js';
import type { LibvirtSummary } from '../conversations/libvirt-summary.js';
import { bytes, duration, storeReadLine, uploadLine } from './format.js';

export const hex = (n: number): string => `0x${n.toString(16)}`;

function table(rows: string[][], indent = '  '): string[] {
  const widths: number[] = [];
  for (const r of rows) r.forEach((c, i) => { widths[i] = Math.max(widths[i] ?? 0, c.length); });
  return rows.map((r) => indent + r.map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!))).join('  ').trimEnd());
}

/** Runs of one handler's PART sections fold into one line: a long migration writes dozens. */
function sectionRows(sections: InspectSection[]): string[][] {
  const rows: string[][] = [['offset', 'type', 'id', 'name', 'inst', 'ver', 'size', '']];
  for (let i = 0; i < sections.length; i++) {
    const s = sections[i]!;
    let type = s.type;
    let size = s.size;
    let recs = s.pageRecords !== undefined ? [s.pageRecords, s.zeroRecords ?? 0, s.xbzrleRecords ?? 0] : undefined;
    if (s.type === 'PART') {
      let j = i + 1;
      // Only one handler's PARTs fold together (RAM's and dirty-bitmap's alternate).
      while (j < sections.length && sections[j]!.type === 'PART' && sections[j]!.idstr === s.idstr) {
        size += sections[j]!.size;
        if (recs) { recs[0]! += sections[j]!.pageRecords ?? 0; recs[1]! += sections[j]!.zeroRecords ?? 0; recs[2]! += sections[j]!.xbzrleRecords ?? 0; }
        j++;
      }
      if (j - i > 1) type = `PART ×${j - i}`;
      i = j - 1;
    }
    const note = recs ? `${recs[0]} page, ${recs[1]} zero${recs[2] ? `, ${recs[2]} xbzrle` : ''} records` : '';
    rows.push([hex(s.offset), type, s.sectionId !== undefined ? String(s.sectionId) : '', s.idstr ?? '', s.instanceId !== undefined ? String(s.instanceId) : '', s.versionId !== undefined ? String(s.versionId) : '', String(size), note]);
  }
  return rows;
}

export function problemLine(p: Problem): string {
  return `${p.severity.padEnd(7)} at ${hex(p.offset)} (byte ${p.offset}): ${p.message} [${p.code}]`;
}

export function inspectText(r: InspectResult): string {
  const lines = [
    `file:          ${r.file} (${r['file-size']} bytes, ${bytes(r['file-size'])})`,
    `format:        ${r.format}`,
    ...(r.object ? [`stored as:     packed object v${r.object.version}, ${r.object['object-size']} bytes (${bytes(r.object['object-size'])}): ${r.object['present-pages']} pages from 0x${r.object['pages-offset'].toString(16)}; offsets below are in the file it expands to`] : []),
    `machine:       ${r.machine}`,
    `capabilities:  ${r.capabilities.length ? r.capabilities.join(', ') : '(none validated)'}`,
    `uuid:          ${r.uuid ?? '(none)'}`,
  ];
  if (r.libvirt) lines.push(libvirtLines(r.libvirt)[0]!);
  if (r['target-page-bits'] !== undefined) lines.push(`page bits:     ${r['target-page-bits']}`);
  lines.push(`configuration: at ${hex(r.configuration.offset)}, ${r.configuration.size} bytes`);
  const rs = r['ram-section'];
  lines.push(`RAM section:   "ram" id ${rs['section-id']}, instance ${rs['instance-id']}, version ${rs.version}; MEM_SIZE ${hex(r['mem-size'])} (${bytes(r['mem-size'])})${r['switchover-start'] ? '; SWITCHOVER_START' : ''}`);
  const ds = r['device-state'];
  lines.push(`device state:  at ${hex(ds.offset)}, ${ds.size} bytes; EOF at ${hex(ds['eof-offset'] ?? 0)}${ds['vmdesc-offset'] !== undefined ? `, VMDESCRIPTION at ${hex(ds['vmdesc-offset'])} (${ds['vmdesc-length']} bytes of JSON)` : ''}`);
  for (const it of r['iterable-sections'] ?? []) lines.push(`iterable:      "${it.name}": ${it.sections} sections, ${it.size} bytes (${bytes(it.size)}), carried as bytes`);
  lines.push('', 'RAM blocks:');
  const mapped = r.format === 'mapped-ram';
  const deltas = r.blocks.some((b) => b['xbzrle-records'] !== undefined);
  const head = ['name', 'size', 'pages', 'present', 'zero', 'data bytes', mapped ? 'header / bitmap / pages offsets' : deltas ? 'page / zero / xbzrle records' : 'page / zero records'];
  const rows = [head, ...r.blocks.map((b) => [
    b.name, bytes(b['used-length']), String(b.pages), String(b.present), String(b.zero), String(b.bytes),
    b.shared ? 'shared: in the backing file (x-ignore-shared)' : mapped && b['mapped-ram'] ? `${hex(b['mapped-ram'].headerOffset)} / ${hex(b['mapped-ram'].bitmapOffset)} / ${hex(b['mapped-ram'].pagesOffset)}` : `${b['page-records'] ?? 0} / ${b['zero-records'] ?? 0}${deltas ? ` / ${b['xbzrle-records'] ?? 0}` : ''}`,
  ])];
  lines.push(...table(rows));
  lines.push('', `sections (${r.sections.length} records):`);
  lines.push(...table(sectionRows(r.sections)));
  if (r.devices) {
    lines.push('', `devices (${r.devices.length}):`);
    for (const d of r.devices) {
      lines.push(`  ${d.idstr} instance ${d['instance-id']} (section ${d['section-id']}, version ${d.version}${d['vmsd-name'] && d['vmsd-name'] !== d.idstr ? `, vmsd ${d['vmsd-name']}` : ''}) at ${hex(d.offset)}, ${d.size} bytes`);
      if (d.state) lines.push(...structToLines(d.state, '    '));
    }
  }
  if (r.libvirt) lines.push('', ...libvirtLines(r.libvirt).slice(1));
  if (r.problems.length) {
    lines.push('', `problems (${r.problems.length}; see \`multifd verify\`):`);
    for (const p of r.problems) lines.push(`  ${problemLine(p)}`);
  }
  return lines.join('\n');
}

/** The header line, then (when the summary has them) the domain XML and the cookie. */
function libvirtLines(l: LibvirtSummary): string[] {
  const lines = [
    `libvirt:       ${l.format} save image, version ${l.version}${l['byte-swapped'] ? ' (other endianness)' : ''}, ${l['was-running'] ? 'was running' : 'was paused'}; data_len ${l['data-len']}, QEMU stream at ${hex(l['qemu-offset'])}${l['cookie-offset'] ? `, cookie at +${l['cookie-offset']}` : ', no cookie'}`,
  ];
  if (l['domain-xml'] !== undefined) lines.push('domain XML:', ...l['domain-xml'].trimEnd().split('\n').map((x) => `  ${x}`));
  if (l.cookie !== undefined) lines.push('cookie:', ...l.cookie.trimEnd().split('\n').map((x) => `  ${x}`));
  return lines;
}

export function verifyText(r: VerifyResult): string {
  const c = r.checked;
  const what = [r.format, r.machine].filter(Boolean).join(', ');
  const head = r.ok
    ? `${r.file}: OK (${what}; ${c.blocks} RAM blocks, ${c['ram-sections']} RAM sections, ${c.devices} device sections${c['pages-present'] !== undefined ? `, ${c['pages-present']} pages present` : ''}${r.warnings ? `; ${r.warnings} warning(s)` : ''})`
    : `${r.file}: FAILED (${what || 'unknown format'}): ${r.errors} error(s), ${r.warnings} warning(s)`;
  return [head, ...(r.libvirt ? libvirtLines(r.libvirt).map((x) => `  ${x}`) : []), ...r.problems.map((p) => `  ${problemLine(p)}`)].join('\n');
}

export function convertText(s: ConvertSummary): string {
  const lines = [
    `converted ${s.input} (${s.from}, ${bytes(s['input-size'])}) to ${s.output} (${s.to}, ${bytes(s['output-size'])}) in ${duration(s['elapsed-ms'])}`,
    `  ${s.machine}: ${s.pages} pages with data, ${s['device-state-bytes']} bytes of device state`,
  ];
  for (const b of s.blocks) lines.push(`  block ${b.name}: ${bytes(b['used-length'])}, ${b.pages} pages`);
  if (s.store) lines.push('parts' in s.store ? uploadLine(s.store) : storeReadLine(s.store));
  for (const n of s.notes ?? []) lines.push(`note: ${n}`);
  return lines.join('\n');
}

export function extractText(s: ExtractSummary): string {
  const lines = [`extracted ${s.blocks.length} block(s) from ${s.file} (${s.format}) in ${duration(s['elapsed-ms'])}`];
  for (const b of s.blocks) lines.push(`  ${b.name} -> ${b.output}: ${bytes(b['used-length'])}, ${b.pages} pages written (${bytes(b['bytes-written'])}), rest left as holes`);
  for (const b of s.skipped ?? []) lines.push(`  ${b.name}: skipped, left out by x-ignore-shared (its memory is in the backend's shared file, not in the snapshot)`);
  for (const n of s.notes ?? []) lines.push(`note: ${n}`);
  if (s.store) lines.push(storeReadLine(s.store));
  return lines.join('\n');
}
