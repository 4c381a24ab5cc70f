// A node:test reporter for scripts/run-tests.mjs: writes one JSON line per finished test or
// suite (file, name, nesting, type, outcome, skip/todo reason, duration), which the runner turns into the
// closing summary of what ran and what was skipped. Works on Node 20, 22 and 24.
export default async function* results(source) {
  for await (const event of source) {
    if (event.type !== 'test:pass' && event.type !== 'test:fail') continue;
    const d = event.data;
    yield `${JSON.stringify({
      file: d.file ?? '',
      name: d.name,
      nesting: d.nesting,
      type: d.details?.type ?? 'test',
      ok: event.type === 'test:pass',
      skip: d.skip === undefined || d.skip === false ? undefined : d.skip === true ? '' : String(d.skip),
      todo: d.todo === undefined || d.todo === false ? undefined : d.todo === true ? '' : String(d.todo),
      ms: d.details?.duration_ms ?? 0,
    })}\n`;
  }
}
