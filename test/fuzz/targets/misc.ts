// The return path (destination → source messages) and QMP replies.

import { readFileSync } from 'node:fs';
import { ReturnPathMessage } from '../../../src/codec/constants.js';
import { ProtocolError } from '../../../src/codec/errors.js';
import { QmpLineSplitter, QmpProtocolError, type QmpMessage } from '../../../src/codec/qmp.js';
import { ReturnPathParser, encodePong, encodeReturnPathMessage, encodeShut, encodeSwitchoverAck } from '../../../src/codec/return-path.js';
import { FIXTURES_DIR } from '../../helpers/fixtures.js';
import { chunkPlan, chunks, stringifyDeep } from '../mutators.js';
import { captures } from '../seeds.js';
import { check, messageTemplate, type Target } from '../target.js';
import { isProtocolError, protocolSignature } from './stream.js';

// ---- return path ----------------------------------------------------------------------------

function runRp(input: Buffer, plan: readonly number[]): { msgs: string[]; error?: ProtocolError } {
  const p = new ReturnPathParser();
  const msgs: string[] = [];
  let bytes = 0;
  try {
    for (const c of chunks(input, plan)) {
      p.push(c);
      for (let m = p.next(); m !== null; m = p.next()) {
        check(m.type >= 1 && m.type <= ReturnPathMessage.SWITCHOVER_ACK, `message type ${m.type} accepted`);
        bytes += 4 + m.payload.length;
        check(bytes <= input.length, 'messages longer than the input');
        msgs.push(`${m.type}:${m.payload.toString('hex')}`);
      }
    }
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    return { msgs, error: e };
  }
  return { msgs };
}

export const returnPathTarget: Target = {
  name: 'return-path',
  what: 'ReturnPathParser (SHUT, PONG, REQ_PAGES(_ID), RECV_BITMAP, RESUME_ACK, SWITCHOVER_ACK) whole and re-chunked: same messages, same error',
  seeds: () => {
    const req = Buffer.alloc(12);
    req.writeBigUInt64BE(0x100000n);
    req.writeUInt32BE(4096, 8);
    const reqId = Buffer.concat([req, Buffer.from([6]), Buffer.from('pc.ram')]);
    const bitmap = Buffer.concat([Buffer.from([6]), Buffer.from('pc.ram')]);
    return [
      { name: 'pong-shut', data: Buffer.concat([encodeSwitchoverAck(), encodePong(1), encodePong(2), encodeShut(0)]) },
      { name: 'requests', data: Buffer.concat([encodeReturnPathMessage(ReturnPathMessage.REQ_PAGES_ID, reqId), encodeReturnPathMessage(ReturnPathMessage.REQ_PAGES, req), encodeReturnPathMessage(ReturnPathMessage.RECV_BITMAP, bitmap), encodeReturnPathMessage(ReturnPathMessage.RESUME_ACK, Buffer.from([0, 0, 0, 1]))]) },
      { name: 'shut-fail', data: encodeShut(1) },
    ];
  },
  run(input, rng) {
    const whole = runRp(input, [input.length]);
    const split = runRp(input, chunkPlan(input.length, rng));
    check(whole.msgs.join() === split.msgs.join() && whole.error?.code === split.error?.code, 'chunking changes the messages');
    if (whole.error) throw whole.error;
    return `ok ${[...new Set(whole.msgs.map((m) => m.split(':')[0]))].sort().join(',')}`;
  },
  typed: isProtocolError,
  errorSignature: protocolSignature,
  maxInput: 64 * 1024,
};

// ---- QMP ------------------------------------------------------------------------------------

/** Replies as QEMU wrote them: the greeting and the values recorded in each capture's meta.json. */
function qmpTranscripts(): { name: string; data: Buffer }[] {
  const out: { name: string; data: Buffer }[] = [];
  // QEMU's json-writer separators.
  const q = (v: unknown): string => JSON.stringify(v).replace(/,"/g, ', "').replace(/":/g, '": ');
  for (const s of captures().slice(0, 4).concat(captures().filter((x) => x.entry.qemu === '11.1').slice(0, 2))) {
    const meta = JSON.parse(readFileSync(`${FIXTURES_DIR}${s.entry.dir}/meta.json`, 'utf8')) as Record<string, unknown>;
    const lines = [
      q({ QMP: { version: meta['qemu_version'], capabilities: ['oob'] } }),
      q({ return: {}, id: 'multifd-1' }),
      q({ return: { status: 'prelaunch', running: false }, id: 'multifd-2' }),
      q({ return: (meta['capabilities_enabled'] as string[]).map((c) => ({ state: true, capability: c })), id: 'multifd-3' }),
      q({ return: meta['parameters_effective'], id: 'multifd-4' }),
      q({ timestamp: { seconds: 1763779201, microseconds: 5 }, event: 'MIGRATION', data: { status: 'setup' } }),
      q({ return: meta['query_migrate_final'], id: 5 }),
      q({ id: 'multifd-6', error: { class: 'GenericError', desc: "Parameter 'uri' is missing" } }),
    ];
    out.push({ name: s.label, data: Buffer.from(lines.join(s.entry.qemu === '10.0' ? '\r\n' : '\n') + '\n', 'utf8') });
  }
  return out;
}

function runQmp(input: Buffer, plan: readonly number[], maxLineBytes?: number): { msgs: string[]; error?: QmpProtocolError } {
  const sp = new QmpLineSplitter(maxLineBytes === undefined ? {} : { maxLineBytes });
  const msgs: string[] = [];
  try {
    for (const c of chunks(input, plan)) {
      for (const m of sp.push(c)) {
        check(['greeting', 'return', 'error', 'event'].includes((m as QmpMessage).kind), 'unknown message kind');
        if (m.kind === 'error') check(typeof m.error.class === 'string' && typeof m.error.desc === 'string', 'error reply without string class/desc');
        if (m.kind === 'event') check(typeof m.event === 'string' && typeof m.data === 'object' && m.data !== null && !Array.isArray(m.data), 'event shape');
        msgs.push(stringifyDeep(m, false));
      }
    }
  } catch (e) {
    if (!(e instanceof QmpProtocolError)) throw e;
    // The messages of the failing push that came before the bad line.
    for (const m of e.messages) msgs.push(stringifyDeep(m, false));
    return { msgs, error: e };
  }
  check(sp.bufferedBytes <= input.length, 'buffers more than it was given');
  return { msgs };
}

export const qmpTarget: Target = {
  name: 'qmp',
  what: 'QmpLineSplitter + classifyQmpMessage on QMP transcripts built from the replies recorded in the captures: messages or QmpProtocolError, same messages whatever the chunking, and with a 4 KiB line cap either the same messages or LINE_TOO_LONG',
  seeds: () => qmpTranscripts(),
  dictionary: () => ['['.repeat(6000) + ']'.repeat(6000), '{"return": ', '{"QMP": ', '{"error": {"class": ', '"event": ', '"id": ', '\\u0000', '\r\n', '\n', '"timestamp": {"seconds": ', 'null', '[]', '{}', '1e999', '"\\ud800"', '\xff', '\xc3'].map((s) => Buffer.from(s, 'latin1')),
  run(input, rng) {
    const whole = runQmp(input, [input.length]);
    const split = runQmp(input, chunkPlan(input.length, rng));
    // push() hands the messages of a chunk that came before a bad line over with its error, so the
    // messages up to the error are the same whatever the chunking.
    const agree = (a: ReturnType<typeof runQmp>, b: ReturnType<typeof runQmp>): boolean =>
      a.error?.code === b.error?.code && a.msgs.join('\n') === b.msgs.join('\n');
    check(agree(whole, split), `chunking changes the QMP messages (${whole.msgs.length}/${whole.error?.code} vs ${split.msgs.length}/${split.error?.code})`);
    const capped = runQmp(input, chunkPlan(input.length, rng), 4096);
    if (capped.error?.code !== 'LINE_TOO_LONG') check(agree(whole, capped), 'a 4 KiB line cap changes messages without LINE_TOO_LONG');
    if (whole.error) throw whole.error;
    return `ok ${[...new Set(whole.msgs.map((m) => (JSON.parse(m) as QmpMessage).kind))].sort().join(',')}`;
  },
  typed: (e) => e instanceof QmpProtocolError,
  errorSignature: (e) => (e instanceof QmpProtocolError ? `${e.code}:${messageTemplate(e.message.split(':')[0]!)}` : 'other'),
  maxInput: 256 * 1024,
};
