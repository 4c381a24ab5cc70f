import { startQemu, dumpGuestMemory, waitMigration } from '../test/helpers/qemu.js';
import { receive } from '../src/conversations/receive.js';
import { mkdtempSync, copyFileSync } from 'node:fs';

const version = (process.argv[2] ?? '10') as '10' | '11';
const channels = Number(process.argv[3] ?? 2);
const dir = mkdtempSync('/tmp/mfd-e2e-');
const out = `${dir}/vm.mig`; copyFileSync('test/fixtures/guest-blob.bin', `${dir}/blob.bin`);
const src = await startQemu({ version, memMiB: 128, paused: true, extraArgs: ['-device', `loader,file=${dir}/blob.bin,addr=0x100000,force-raw=on`] });
const h = receive({ listen: 'tcp:127.0.0.1:0', out, channels });
h.on('progress', (p) => console.log('progress', JSON.stringify(p)));
const addr = await h.listening;
console.log('listening', addr);
if (channels > 0) await src.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'multifd', state: true }] });
await src.qmp.execute('migrate-set-parameters', { 'max-bandwidth': 107374182400, ...(channels > 0 ? { 'multifd-channels': channels } : {}) });
await src.qmp.execute('migrate', { uri: addr });
try {
  const s = await h.done;
  console.log('summary', JSON.stringify(s, null, 1).slice(0, 1500));
} catch (e) { console.log('receive failed', e); }
console.log('source', (await waitMigration(src.qmp)).status);
const before = await dumpGuestMemory(src, 0, 128 * 1024 * 1024);
await src.kill();
const dst = await startQemu({ version, memMiB: 128, incoming: 'defer' });
await dst.qmp.execute('migrate-set-capabilities', { capabilities: [{ capability: 'mapped-ram', state: true }, { capability: 'multifd', state: true }] });
await dst.qmp.execute('migrate-incoming', { uri: `file:${out}` });
const r = await waitMigration(dst.qmp);
console.log('dest', r.status, r['error-desc'] ?? '');
const after = await dumpGuestMemory(dst, 0, 128 * 1024 * 1024);
console.log('memory equal', before.equals(after));
await dst.kill();
