#!/usr/bin/env node
// Thin launcher: the CLI is compiled from src/cli by `npm run build`.
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
const entry = new URL('../dist/src/cli/main.js', import.meta.url);
if (!existsSync(fileURLToPath(entry))) {
  process.stderr.write('multifd: not built yet; run `npm install && npm run build` in ' +
    fileURLToPath(new URL('..', import.meta.url)) + '\n');
  process.exit(2);
}
await import(entry.href);
