// The diagnostics table: docs/diagnostics.md lists exactly the declared channels, every publish in
// the sources names a declared one, and --verbose subscribes from the same table.

import assert from 'node:assert/strict';
import { subscribe, unsubscribe } from 'node:diagnostics_channel';
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { DIAGNOSTICS, declaredChannels, publish } from '../../src/engine/diagnostics.js';

const root = fileURLToPath(new URL('../../../', import.meta.url));

function sources(dir: string): string[] {
  return readdirSync(dir).flatMap((n) => {
    const p = join(dir, n);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

test('docs/diagnostics.md lists every declared channel, and nothing else', () => {
  const doc = readFileSync(join(root, 'docs/diagnostics.md'), 'utf8');
  const rows = [...doc.matchAll(/^\| `(multifd:[^`]+)` \| (.*) \| `(.*)` \| (yes|no) \|$/gm)].map((m) => ({ name: m[1], when: m[2], message: m[3], verbose: m[4] }));
  const declared = declaredChannels().map((c) => ({ name: c.name, when: c.spec.when, message: c.spec.message, verbose: c.spec.quiet ? 'no' : 'yes' }));
  assert.deepEqual(rows, declared);
});

test('every publish() in src names a declared group and event', () => {
  const seen = new Set<string>();
  for (const f of sources(join(root, 'src'))) {
    // The inbound side publishes for the conversation it serves: receive or relay.
    for (const m of readFileSync(f, 'utf8').matchAll(/\bpublish\((?:'([^']+)'|this\.o\.conversation), '([^']+)'/g)) {
      for (const group of m[1] ? [m[1]] : ['receive', 'relay']) {
        const events = (DIAGNOSTICS as Record<string, Record<string, unknown>>)[group];
        assert.ok(events && m[2]! in events, `${f}: publish('${group}', '${m[2]}') is not declared`);
        seen.add(`multifd:${group}:${m[2]}`);
      }
    }
  }
  // Every declared channel is published somewhere: a stale row would document nothing.
  for (const c of declaredChannels()) assert.ok(seen.has(c.name), `${c.name} is declared but never published`);
});

test('publish() reaches subscribers of multifd:<conversation>:<event>', () => {
  const got: unknown[] = [];
  const on = (m: unknown): void => { got.push(m); };
  subscribe('multifd:send:pong', on);
  try {
    publish('send', 'pong', { value: 3 });
  } finally {
    unsubscribe('multifd:send:pong', on);
  }
  assert.deepEqual(got, [{ value: 3 }]);
});
